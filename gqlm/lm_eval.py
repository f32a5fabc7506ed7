"""python -m gqlm.lm_eval --workdir DIR --tasks T[,T2] [--limit N] [--step N] [--batch_size B]
[--num_fewshot K] [--include_path TASK_DIR] [--output PATH] [--add_bos_token] [--config.a.b=v ...]

lm-evaluation-harness tasks on a training workdir's checkpoint, run directly by the `gqlm` model
class (gqlm/eval/harness.py) on the run's mesh. Prints lm-eval's table and writes its results as
JSON (default: DIR/lm_eval/<tasks>_step<N>.json). `--include_path` adds a directory of task
YAMLs (tests/lm_eval_task/ is an offline example). Task names are checked before the model is
loaded; an unknown task, a workdir without checkpoints or a missing `eval` extra is one line and
exit 2, with nothing written. See docs/interop.md.
"""

import functools
import json
import logging
import os
import re

from absl import flags

from gqlm import cli
from gqlm.config import apply_overrides
from gqlm.train.checkpoint import checkpoint_directory, is_remote

try:  # the `eval` extra is optional
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable, make_table

    from gqlm.eval.harness import GQLM
    MISSING_EXTRA = None
except ImportError as e:
    if (e.name or "").startswith("gqlm"):
        raise
    MISSING_EXTRA = e.name or str(e)

cli.define_saved_run_flags()
flags.DEFINE_list("tasks", None, "lm-eval task names, globs or YAML files, comma-separated.")
flags.DEFINE_integer("limit", None, "Evaluate only the first N documents of each task.")
flags.DEFINE_integer("num_fewshot", None, "Few-shot examples per prompt (default: each task's own).")
flags.DEFINE_integer("batch_size", 16, "Rows per batch (rounded up to a multiple of the data-parallel devices).")
flags.DEFINE_string("include_path", None, "A directory of custom task YAMLs.")
flags.DEFINE_string("output", None, "Results JSON (default: WORKDIR/lm_eval/<tasks>_step<N>.json).")
flags.DEFINE_boolean("add_bos_token", False, "Prepend BOS to every request, as lm-eval's hf add_bos_token=True.")
FLAGS = flags.FLAGS


def checked_tasks(manager: "TaskManager", names: list[str]) -> list[str]:
    """The task names (globs expanded, YAML files kept); an unknown one is a one-line error."""
    out = []
    for name in names:
        matches = [name] if name.endswith(".yaml") and os.path.isfile(name) else manager.match_tasks([name])
        if not matches:
            cli.fail(f"--tasks: no lm-eval task named {name!r} (list them with `lm-eval ls tasks`; "
                     "custom task YAMLs need --include_path)")
        out += [m for m in matches if m not in out]
    return out


def default_output(workdir: str, tasks: list[str], step: int) -> str:
    name = "+".join(re.sub(r"[^\w.-]", "_", os.path.basename(t)) for t in tasks)
    return os.path.join(workdir, "lm_eval", f"{name[:120]}_step{step}.json")


def write_json(path: str, results: dict) -> None:
    """Atomically (a killed run leaves no half-written file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=2, default=handle_non_serializable, ensure_ascii=False)
    os.replace(path + ".tmp", path)


def main(argv: list[str]) -> None:
    if MISSING_EXTRA:
        cli.fail(f"gqlm.lm_eval needs lm-evaluation-harness ({MISSING_EXTRA} is missing): pip install -e .[eval]")
    if not FLAGS.workdir or not FLAGS.tasks:
        cli.fail("--workdir and --tasks are required")
    for name, low in (("limit", 1), ("batch_size", 1), ("num_fewshot", 0)):  # lm-eval fails on these deep inside
        if FLAGS[name].value is not None and FLAGS[name].value < low:
            cli.fail(f"--{name}={FLAGS[name].value} must be >= {low}")
    if FLAGS.include_path and not os.path.isdir(FLAGS.include_path):
        cli.fail(f"--include_path={FLAGS.include_path!r} is not a directory")
    if FLAGS.output and os.path.isdir(FLAGS.output):
        cli.fail(f"--output={FLAGS.output!r} is a directory; give a file path")
    if not is_remote(FLAGS.workdir) and not os.path.isdir(checkpoint_directory(FLAGS.workdir)):
        cli.fail(f"no checkpoints in {FLAGS.workdir!r} (expected {checkpoint_directory(FLAGS.workdir)})")
    if not FLAGS["verbosity"].present:  # as cli.run does for absl: lm-eval's warnings drown the table
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
    manager = TaskManager(include_path=FLAGS.include_path)
    tasks = checked_tasks(manager, FLAGS.tasks)
    edit = functools.partial(apply_overrides, overrides=cli.overrides())
    model = GQLM(FLAGS.workdir, FLAGS.step, FLAGS.batch_size, add_bos_token=FLAGS.add_bos_token, edit=edit)
    results = lm_eval.simple_evaluate(model=model, tasks=tasks, num_fewshot=FLAGS.num_fewshot, limit=FLAGS.limit,
                                      task_manager=manager, log_samples=False)
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    output = FLAGS.output or default_output(FLAGS.workdir, FLAGS.tasks, model.step)
    write_json(output, results)
    print(f"wrote {output}")


if __name__ == "__main__":
    cli.run(main)

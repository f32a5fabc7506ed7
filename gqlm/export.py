"""python -m gqlm.export --workdir DIR [--step N] --out HF_DIR [--config.a.b=v ...]

Writes a training workdir's checkpoint as a Hugging Face model directory: `config.json`,
`model.safetensors` and the tokenizer (`tokenizer.json`, `tokenizer_config.json`), which
`transformers.AutoModelForCausalLM` / `AutoTokenizer` load without custom code. Dense models
become LlamaForCausalLM, all-MoE models MixtralForCausalLM; what neither can express (ALiBi,
NoPE, a shared expert, MoE on some layers only, capacity dispatch, the GQ-VAE tokenizer) is
refused before the checkpoint is read, with one line naming the config key (exit 2). So is an
`--out` holding files an export does not write (another model's shards would load beside it); the
files are written next to `--out` and moved in only when all are complete. See docs/interop.md.
"""

import functools

import jax
from absl import flags

from gqlm import cli
from gqlm.config import ConfigDict, apply_overrides
from gqlm.interop import hf, hf_config
from gqlm.train.checkpoint import restore_trained
from gqlm.train.tasks.lm import LMTask

cli.define_saved_run_flags()
flags.DEFINE_string("out", None, "The HF model directory to write.")
FLAGS = flags.FLAGS


def checked(config: ConfigDict, overrides: dict) -> ConfigDict:
    """The saved config with the command line's overrides, refused if it cannot be exported."""
    return hf.check_exportable(apply_overrides(config, overrides))


def main(argv: list[str]) -> None:
    if not FLAGS.workdir or not FLAGS.out:
        cli.fail("--workdir and --out are required")
    hf.check_out_dir(FLAGS.out, "--out")  # before the checkpoint is read
    edit = functools.partial(checked, overrides=cli.overrides())
    exp, step, state = restore_trained(FLAGS.workdir, LMTask(), FLAGS.step, edit)
    with jax.set_mesh(exp.mesh):
        hf.export_model(state.params, exp.config.model, exp.tokenizer, FLAGS.out)
    kind = "mixtral" if exp.config.model.moe.num_experts else "llama"
    print(f"exported step {step} of {FLAGS.workdir} to {FLAGS.out} ({hf_config.ARCHITECTURES[kind]})")


if __name__ == "__main__":
    cli.run(main)

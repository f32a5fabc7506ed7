"""A GQ-VAE workdir's parameters alone, as a directory `gqlm.tokenize --kind gqvae` reads.

    python benchmarks/gqvae_export.py WORKDIR OUT_DIR

The runner's checkpoint holds the optimizer state and the re-seeding buffer too (~3x the
parameters); a model trained on a lent machine travels back as OUT_DIR (`gqvae.json` + orbax
`params`, the format `gqlm.train.tasks.gqvae.checkpoint` reads besides workdirs) + metrics.jsonl.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import orbax.checkpoint as ocp

from gqlm.train.tasks.gqvae.checkpoint import LEGACY_KIND, LEGACY_MANIFEST, load_checkpoint


def export(workdir: str, out: str) -> None:
    cfg, params = load_checkpoint(workdir)
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, LEGACY_MANIFEST), "w") as f:
        json.dump({"kind": LEGACY_KIND, "format_version": 1, "gqvae": cfg.to_dict()}, f)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(os.path.join(out, "params"), params)
    metrics = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(metrics):
        shutil.copy(metrics, out)
    print(f"exported {workdir} -> {out}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.strip().splitlines()[2].strip())
    export(sys.argv[1], sys.argv[2])

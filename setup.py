"""gqlm: pretraining language models with JAX on any device mesh."""
from setuptools import find_packages, setup

setup(
    name="gqlm",
    version="0.1.0",
    description="JAX/Flax LM pretraining: GQ-VAE tokenizer, SOAP, MoE, sharded runner.",
    python_requires=">=3.11",
    packages=find_packages(include=["gqlm", "gqlm.*"]),
    install_requires=[
        "jax==0.10.2",
        "flax==0.12.8",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "grain==0.2.18",
        "ml-collections==1.1.0",
        "tensorflow-datasets==4.9.10",
        "tokenizers==0.23.3",
        "absl-py==2.5.1",
        "numpy==2.4.6",
        "tqdm==4.70.1",
        "tensorboardX==2.6.5",
        "regex==2026.11.19",
        "matplotlib==3.11.2",  # scaling-fit and synthetic-task plots
        "pyarrow==25.0.1",  # parquet corpora and score files (the version apache-beam 2.77 accepts)
        "zstandard==0.25.0",  # .jsonl.zst corpora
        "safetensors==0.8.0",  # HF checkpoints: gqlm.export, init.from_hf (numpy only, no torch)
    ],
    extras_require={
        "test": ["pytest==9.2.0", "pytest-xdist==3.8.0"],
        # transformers: HF interop parity tests; accelerate: lm-eval's `hf` backend (tests/test_lm_eval.py)
        "parity": ["torch==2.13.0", "transformers==5.24.0", "accelerate==1.16.0"],
        "beam": ["apache-beam==2.77.0"],  # gqlm.prepare --runner=beam (DirectRunner here; Dataflow/Flink/Spark)
        "eval": ["lm-eval==0.4.13"],  # gqlm.lm_eval (lm-evaluation-harness model class)
        "wandb": ["wandb==0.31.0"],  # train.wandb_project
        "gcs": ["gcsfs==2026.10.1"],  # gs:// inputs and outputs of gqlm.prepare and gqlm.tokenize
    },
)

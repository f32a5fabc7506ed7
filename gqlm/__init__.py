"""gqlm: pretraining language models with JAX on any device mesh."""

__version__ = "0.1.0"

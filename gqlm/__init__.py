"""gqlm: pretraining language models with JAX on any device mesh."""

import os

# XLA:CPU runs eigh/QR (SOAP's preconditioner refresh) through OpenBLAS; its thread pool fights the
# fake CPU devices for the cores (a 512x512 eigh measured 4.5 s instead of 0.014 s). One LAPACK
# thread per call is right for the CPU mesh and irrelevant on GPU/TPU. Set before numpy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

__version__ = "0.1.0"

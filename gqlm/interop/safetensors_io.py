"""safetensors files: a streaming writer (one tensor in host memory at a time) and a lazy reader.

The writer lays the header out from the tensors' names, dtypes and shapes before any data is
written, so an exporter can fetch one parameter from the devices, write it and drop it. The
header is deterministic (tensors in the order given, compact JSON), so writing the same
tensors twice gives the same bytes. The reader wraps `safetensors.safe_open`: nothing is read
until a slice is asked for, so each device can read only its shard. A checkpoint is one
`model.safetensors` or several shards listed by `model.safetensors.index.json` (read only when
there is no `model.safetensors`, as transformers does).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from typing import Any, Iterable, NamedTuple

import ml_dtypes
import numpy as np
from safetensors import safe_open

from gqlm.config import ConfigError

MODEL_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DTYPES = {"F32": np.dtype(np.float32), "BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype(np.float16)}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


class TensorSpec(NamedTuple):
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]


def _header(specs: list[TensorSpec]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for s in specs:
        if s.dtype not in DTYPE_NAMES:
            raise ValueError(f"safetensors: {s.name} has dtype {s.dtype}, not one of {sorted(DTYPES)}")
        size = math.prod(s.shape) * s.dtype.itemsize
        header[s.name] = {"dtype": DTYPE_NAMES[s.dtype], "shape": list(s.shape),
                          "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)


def write_safetensors(path: str, specs: list[TensorSpec], tensors: Iterable[tuple[str, np.ndarray]]) -> None:
    """Writes `tensors` (name, array), in the order and with the names/dtypes/shapes of `specs`,
    to `path` atomically (a temporary file renamed at the end)."""
    header = _header(specs)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(len(header).to_bytes(8, "little"))
        f.write(header)
        count = 0
        for spec, (name, x) in zip(specs, tensors, strict=True):
            if (name, x.dtype, tuple(x.shape)) != tuple(spec):
                raise ValueError(f"safetensors: got {name} {x.dtype} {x.shape}, expected {tuple(spec)}")
            f.write(np.ascontiguousarray(x).tobytes())  # little-endian hosts only (x86, Arm, TPU VMs)
            count += 1
    os.replace(tmp, path)


class Checkpoint:
    """The tensors of a HF checkpoint directory, read lazily (a context manager).

    `shapes` maps every tensor name to its shape; `read(name, index)` reads one slice.
    """

    def __init__(self, directory: str, where: str = "init.from_hf"):
        self.directory, self.where = os.path.expanduser(directory), where
        self._handles: dict[str, Any] = {}
        self._stack = contextlib.ExitStack()
        self._files = self._file_of_tensor()
        self.shapes = {name: tuple(self._handle(name).get_slice(name).get_shape()) for name in self._files}

    def _file_of_tensor(self) -> dict[str, str]:
        # model.safetensors first, as transformers reads it: with both present, the same weights
        if os.path.isfile(os.path.join(self.directory, MODEL_FILE)):
            return {name: MODEL_FILE for name in self._open(MODEL_FILE).keys()}
        index = os.path.join(self.directory, INDEX_FILE)
        if not os.path.isfile(index):
            raise ConfigError(f"{self.where}: {self.directory} has neither {MODEL_FILE} nor {INDEX_FILE}")
        try:
            with open(index) as f:
                return dict(json.load(f)["weight_map"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{self.where}: cannot read {index} ({type(e).__name__})")

    def _open(self, file: str) -> Any:
        if file not in self._handles:
            path = os.path.join(self.directory, file)
            try:
                self._handles[file] = self._stack.enter_context(safe_open(path, framework="numpy"))
            except Exception as e:  # safetensors raises its own error types for broken files
                raise ConfigError(f"{self.where}: cannot read {path} ({type(e).__name__}: {e})")
        return self._handles[file]

    def _handle(self, name: str) -> Any:
        return self._open(self._files[name])

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        return np.asarray(self._handle(name).get_slice(name)[index])

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

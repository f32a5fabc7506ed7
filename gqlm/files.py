"""Writing a file so that its name never points at a partial one."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """A temporary path beside `path` to write to: renamed onto `path` when the block completes,
    removed when it does not (an error or an interrupt leaves neither a partial file at `path` nor
    the temporary one)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

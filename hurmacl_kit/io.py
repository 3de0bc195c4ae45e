"""Atomic file writes, so that an interrupted run never leaves a half-written file.

Every writer goes through a temporary file in the destination folder, then
``os.replace``, which is atomic on POSIX and Windows when both paths are on
the same file system.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator


@contextlib.contextmanager
def atomic_path(destination: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``destination`` and move it there on success.

    Args:
        destination: Final path. Its parent folder is created if missing.
        suffix: Suffix of the temporary file, for writers that infer the format
            from the name (``.nii.gz`` for nibabel).

    Raises:
        OSError: If the folder or the file cannot be written, naming ``destination``.
        Any other exception of the body. In every case the temporary file is
        removed and ``destination`` keeps its previous content.
    """
    destination = Path(destination)
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(
            prefix=f".{destination.name}.", suffix=f".tmp{suffix}", dir=destination.parent
        )
    except OSError as error:
        raise OSError(error.errno, f"cannot write {destination}: {error.strerror}; choose a writable folder") from error
    os.close(handle)
    temporary_path = Path(temporary)
    try:
        yield temporary_path
        # mkstemp creates the file with mode 0600; give it the usual mode for new files.
        os.chmod(temporary_path, 0o666 & ~_current_umask())
        os.replace(temporary_path, destination)
    except OSError as error:
        raise OSError(error.errno, f"cannot write {destination}: {error.strerror or error}; choose a writable folder") from error
    finally:
        temporary_path.unlink(missing_ok=True)


def atomic_write_text(destination: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``destination`` atomically."""
    with atomic_path(destination) as temporary:
        temporary.write_text(text, encoding="utf-8")


def atomic_write_json(destination: str | os.PathLike, payload: Any) -> None:
    """Write ``payload`` as indented JSON to ``destination`` atomically."""
    atomic_write_text(destination, json.dumps(payload, indent=2, sort_keys=False) + "\n")


def atomic_save(destination: str | os.PathLike, save: Callable[[Path], None], suffix: str = "") -> None:
    """Call ``save(temporary_path)`` and move the result to ``destination`` atomically.

    Use it for writers that take a path, such as ``torch.save`` or
    ``nibabel.save``: ``atomic_save(path, lambda p: torch.save(obj, p))``.
    """
    with atomic_path(destination, suffix=suffix) as temporary:
        save(temporary)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask

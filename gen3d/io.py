"""Atomic file writing: nothing half-written is ever left under a final name.

Every file gen3d writes (checkpoints, exports, videos, configs) goes through `atomic_path`:
the content is written to a temporary sibling and renamed over the target only once complete,
so an interrupted or failed write leaves the previous file intact.

A write that fails because the disk is full, the file is too large for the system, or the folder is
not writable raises a `Gen3dError` naming the file, the reason and what to do (`write_error`); the
temporary file is removed and the previous file is left as it was.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path
from typing import Iterator

from gen3d.errors import Gen3dError

_REMEDIES = {
    errno.ENOSPC: "the disk is full: free space on it, or write elsewhere (output_dir=... for a run)",
    errno.EDQUOT: "the disk quota is used up: free space, or write elsewhere (output_dir=... for a run)",
    errno.EFBIG: "the file is larger than this system or its limit (ulimit -f) allows: raise the limit or write "
                 "to another file system (output_dir=... for a run)",
    errno.EROFS: "the file system is read-only: write elsewhere (output_dir=... for a run)",
    errno.EACCES: "the folder is not writable by this user: make it writable or write elsewhere "
                  "(output_dir=... for a run)",
    errno.EPERM: "the folder is not writable by this user: make it writable or write elsewhere "
                 "(output_dir=... for a run)",
}


def write_error(exc: BaseException, path: str | os.PathLike) -> Gen3dError | None:
    """The `Gen3dError` for `exc` when it is a failed write of `path` (disk full, file too large, read-only or
    not writable), or None when it is another error (a bug or a bad input, to be raised as it is)."""
    if not isinstance(exc, OSError) or exc.errno not in _REMEDIES:
        return None
    return Gen3dError(f"cannot write '{path}' ({exc.strerror or os.strerror(exc.errno)}); {_REMEDIES[exc.errno]}; "
                      "nothing half-written was left and earlier files are untouched")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success rename it to `path`, on error delete it.

    The temporary name keeps the suffix of `path`, so writers that infer the format from the
    extension (imageio, trimesh) behave the same. A failed write raises `write_error`'s `Gen3dError`.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        with contextlib.suppress(OSError):  # some file systems refuse modes; the file is still written
            tmp.chmod(0o644)  # mkstemp makes it private; the result is an ordinary file
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        error = write_error(exc, path)
        if error is None:
            raise
        raise error from None
    finally:
        if tmp is not None and tmp.exists():
            tmp.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder next to `path`; on success it replaces `path` as a whole.

    An existing `path` is moved aside first and removed only once the new folder is in place, so
    an error at any point leaves either the old folder or the new one, never a mixture. A failed
    write raises `write_error`'s `Gen3dError`, naming the file that could not be written.
    """
    import shutil

    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary folder
        yield tmp
        old = path.with_name(f".{path.name}.old")
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        # name the file inside the folder (tmp/model.safetensors -> path/model.safetensors) when the error has one
        failed = Path(exc.filename) if isinstance(exc.filename, str) else path
        if tmp is not None and failed.parent == tmp:
            failed = path / failed.name
        error = write_error(exc, failed)
        if error is None:
            raise
        raise error from None
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)

"""Atomic filesystem writes: a reader sees the old file or directory or the new one, never a mix.

Files are written to a temporary name in the same directory, fsynced and renamed over the target.
A directory is built in a temporary sibling and swapped in with one ``renameat2(RENAME_EXCHANGE)``
where the kernel has it (else two renames; ``recover_dir`` finishes an interrupted swap).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    """This process's umask, read without changing it (``os.umask`` can only set it, and a
    set-and-restore would briefly give other threads' new files a umask of 0)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # no /proc (not Linux): set-and-restore
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the new one.

    The file gets the permissions ``open()`` would give it (0666 minus the umask), not the
    owner-only 0600 of a temporary file: a checkpoint or a report is read by other users and
    services (a shared cluster volume, a web server)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories (Linux ``renameat2(RENAME_EXCHANGE)``); False if unsupported."""
    libc = _libc()
    if libc is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


@functools.cache
def _libc() -> Any:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        return libc
    except (OSError, AttributeError):
        return None


def recover_dir(path: str | Path) -> None:
    """Undo what a crash inside :func:`atomic_dir` can leave: put a moved-aside ``path`` back.

    Without an atomic exchange, the old directory is renamed to ``.old-<name>-<pid>`` before the
    new one takes its place; a kill between the two renames leaves ``path`` missing. Stale
    ``.tmp-<name>-*`` directories of killed writers are removed.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return
    if not path.exists():
        olds = sorted(path.parent.glob(f".old-{path.name}-*"), key=lambda p: p.stat().st_mtime)
        if olds:
            os.replace(olds[-1], path)
    for stale in path.parent.glob(f".tmp-{path.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``path`` atomically.

    A crash (even SIGKILL) at any point leaves ``path`` as it was or fully replaced: the new
    directory is swapped in with one atomic exchange where the OS has one (Linux), else the old
    one is moved aside first and :func:`recover_dir` (called by writers and by :func:`read_meta`)
    puts it back if the process died between the two renames. One writer per ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".tmp-{path.name}-"))
    umask = _umask()
    try:
        os.chmod(tmp, 0o777 & ~umask)  # what mkdir would give it, not mkdtemp's 0700
        yield tmp
        for f in tmp.iterdir():
            if f.is_file():
                f.chmod(0o666 & ~umask)  # some writers (safetensors) create files owner-only
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if path.exists() and _exchange(tmp, path):
            _fsync_dir(path.parent)  # tmp now holds the old directory; removed below
        else:
            old = None
            if path.exists():
                old = path.parent / f".old-{path.name}-{os.getpid()}"
                os.replace(path, old)
            os.replace(tmp, path)
            _fsync_dir(path.parent)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

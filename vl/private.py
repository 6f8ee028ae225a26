"""Private files and directories on a shared host: what only the current user may read or plant.

Why its own module: the local stack's state (S3 keys, the MLflow admin password, the Ray token,
TLS keys) and the shard cache live on disk where other users of the machine also write (/tmp,
a shared checkout). A directory another user created in advance, or a symlink planted where a
file is about to be written, would hand them our secrets or let them feed us their bytes. So:

- `private_dir` creates a directory 0700, or accepts an existing one only if it is a real
  directory (not a symlink) owned by this user, and tightens it to 0700;
- `write_private` creates a file 0600 under a fresh name (O_CREAT | O_EXCL | O_NOFOLLOW: it can
  never write through a planted file or link) and renames it into place, so the file is never
  readable by others, not even for a moment, and readers see the old or the new bytes only.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path

DIR_MODE = 0o700
FILE_MODE = 0o600


class UnsafePathError(PermissionError):
    """A path that would let another user read our secrets or plant what we read."""


def private_dir(path: str | Path, create: bool = True) -> Path:
    """`path` as a directory only this user can use (see the module doc); returns it resolved.

    Missing parents are created with the default mode (they may be shared, like /tmp); the
    directory itself is checked through a file descriptor opened with O_NOFOLLOW, so a symlink
    swapped in between the check and the chmod is refused too.
    """
    path = Path(path)
    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, DIR_MODE)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as err:
        if path.is_symlink():
            raise UnsafePathError(f"{path} is a symlink; refusing to use it as a private "
                                  "directory (remove it or choose another path)") from None
        if not create and not path.exists():
            raise
        raise UnsafePathError(f"{path} is not a usable directory: {err.strerror}") from None
    try:
        info = os.fstat(fd)
        if info.st_uid != os.geteuid():
            raise UnsafePathError(
                f"{path} is owned by uid {info.st_uid}, not by this user (uid {os.geteuid()}); "
                "refusing to keep private files there (remove it or choose another path)")
        if stat.S_IMODE(info.st_mode) != DIR_MODE:
            os.fchmod(fd, DIR_MODE)
    finally:
        os.close(fd)
    return path.resolve()


def write_private(path: str | Path, data: str | bytes) -> Path:
    """Write `data` to `path` with mode 0600, atomically (see the module doc); returns `path`.

    A symlink or file already at `path` is replaced, never followed. Its directory should be
    one of `private_dir`'s: in a directory others can write to, they could still rename the
    file away after we wrote it.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    payload = data.encode() if isinstance(data, str) else data
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path

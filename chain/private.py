"""Files only the node's own user may read: folders 0700, files 0600 whatever the umask, files written atomically.

Keys, the ledger, the checkpoint, saved models and personal layers go through these; a data root left with looser
modes by an older version is tightened when it is opened, with one log line per path.
"""
from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600

log = logging.getLogger(__name__)


def tighten(path: str | os.PathLike[str], mode: int) -> bool:
    """Drop the permission bits of an existing ``path`` that ``mode`` does not grant (logged); False when there
    was nothing to change or no such path. A symbolic link is left alone, never followed."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    current = stat.S_IMODE(st.st_mode)
    if stat.S_ISLNK(st.st_mode) or not current & ~mode:
        return False
    os.chmod(path, current & mode)
    log.info("tightened the permissions of %s from %04o to %04o", path, current, current & mode)
    return True


def private_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` (and missing parents) and make ``path`` itself 0700. Parents keep the umask's mode: they are
    the operator's folders, not the node's."""
    path = Path(path)
    if not path.is_dir():
        path.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
    tighten(path, PRIVATE_DIR)
    return path


def create_private(path: str | os.PathLike[str]) -> bool:
    """Create ``path`` as an empty 0600 file unless it exists (then tighten it); True when it was created."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, PRIVATE_FILE)
    except FileExistsError:
        tighten(path, PRIVATE_FILE)
        return False
    os.close(fd)
    return True


def write_private(path: str | os.PathLike[str], data: bytes, mode: int = PRIVATE_FILE) -> None:
    """Replace ``path`` atomically with ``data`` in a 0600 file (or ``mode``: a certificate is 0644): write a
    temporary file beside it, fsync, rename, so a crash never leaves half a file behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.urandom(6).hex()}.tmp")   # fresh: never another writer's
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)   # the umask may have taken bits away from a 0644 file
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

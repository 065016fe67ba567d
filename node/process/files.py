"""Where Admin.Save may write, and how: only model files under DATA_ROOT/models/, never through a symbolic link,
never over anything but an earlier saved model, each file 0600 in 0700 folders, replaced atomically."""
from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from chain.private import PRIVATE_DIR, PRIVATE_FILE, tighten
from node.engine.errors import BadRequestError

MODELS_DIR = "models"
MODEL_SUFFIX = ".pt"
MAX_COMPONENT = 255    # bytes in one path component (NAME_MAX)
MAX_PATH = 1024        # bytes in the whole requested path


def models_dir(data_root: str | os.PathLike[str]) -> Path:
    """DATA_ROOT/models, absolute (made absolute as written, not resolved)."""
    return Path(os.path.abspath(data_root)) / MODELS_DIR


def model_path(data_root: str | os.PathLike[str], requested: str | None, default_name: str) -> Path:
    """The file Admin.Save writes for ``requested``: ``default_name`` when empty, a relative path taken inside
    DATA_ROOT/models/, an absolute one only when it lies there. Checks the text alone (no file system access);
    BadRequestError with one line for NUL bytes, ``..``, a path outside models/, a name not ending in .pt, or a
    path too long."""
    folder = models_dir(data_root)
    if not requested:
        requested = default_name
    if "\0" in requested:
        raise BadRequestError("save path must not contain NUL bytes")
    if len(requested.encode("utf-8", "surrogateescape")) > MAX_PATH:
        raise BadRequestError(f"save path is longer than {MAX_PATH} bytes")
    path = PurePosixPath(requested)
    if ".." in path.parts:
        raise BadRequestError("save path must not contain '..'")
    if path.is_absolute():
        try:
            path = path.relative_to(PurePosixPath(folder))
        except ValueError:
            raise BadRequestError(f"save path must lie in {folder}; give a file name to save there") from None
    if not path.parts:
        raise BadRequestError(f"save path names the folder {folder}, not a file")
    if any(len(part.encode("utf-8", "surrogateescape")) > MAX_COMPONENT for part in path.parts):
        raise BadRequestError(f"a save path component is longer than {MAX_COMPONENT} bytes")
    if not path.name.endswith(MODEL_SUFFIX) or path.name == MODEL_SUFFIX:
        raise BadRequestError(f"a saved model's file name must end in {MODEL_SUFFIX}, got {path.name!r}")
    return folder.joinpath(*path.parts)


def write_model(data_root: str | os.PathLike[str], target: Path, write: Callable[[BinaryIO], None]) -> None:
    """Have ``write`` fill a 0600 temporary file beside ``target`` (a ``model_path``), then rename it over
    ``target``. Folders from models/ down are created 0700 and opened without following links, so a symbolic
    link anywhere below the data root, or an existing target that is not a regular file, is refused
    (BadRequestError)."""
    folder = models_dir(data_root)
    parts = target.relative_to(folder).parts
    root_fd = os.open(folder.parent, os.O_RDONLY | os.O_DIRECTORY)
    fds = [root_fd]
    try:
        dir_fd = root_fd
        shown = folder.parent
        for name in (MODELS_DIR, *parts[:-1]):
            shown = shown / name
            dir_fd = _private_subdir(dir_fd, name, shown)
            fds.append(dir_fd)
        _save_in(dir_fd, parts[-1], target, write)
    finally:
        for fd in fds:
            os.close(fd)


def _private_subdir(parent_fd: int, name: str, shown: Path) -> int:
    """Open folder ``name`` under ``parent_fd`` (created 0700 when missing) without following a link."""
    try:
        os.mkdir(name, PRIVATE_DIR, dir_fd=parent_fd)
    except FileExistsError:
        pass
    try:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise BadRequestError(f"refusing to save: {shown} is a symbolic link or not a folder") from None
        raise
    if stat.S_IMODE(os.fstat(fd).st_mode) & ~PRIVATE_DIR:
        tighten(shown, PRIVATE_DIR)
    return fd


def _save_in(dir_fd: int, name: str, target: Path, write: Callable[[BinaryIO], None]) -> None:
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise BadRequestError(f"refusing to save: {target} exists and is not a regular file")
    tmp = f".{name[:200]}.{os.urandom(6).hex()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, PRIVATE_FILE, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)   # a rename never follows a link at ``name``
    except BaseException:
        os.unlink(tmp, dir_fd=dir_fd)
        raise

"""Writing files so that readers never see half of one, and nothing a user made is lost.

Every writer goes through `atomic_write`, which turns an OSError (a read-only place, a file where a
directory should be, a full disk) into one TreeoptError line; `check_writable` asks the same question
up front, before a model is loaded or anything measured."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from treeopt.core.errors import BAD_INPUT, FAILED_RUN, TreeoptError

# errno -> (the problem, the fix, exit code): a place the user named is bad input; the rest failed runs
_PLACE = "pass another output path, or make that one writable"
_OS_PROBLEMS = {
    errno.EACCES: ("permission denied", _PLACE, BAD_INPUT),
    errno.EPERM: ("operation not permitted", _PLACE, BAD_INPUT),
    errno.EROFS: ("the file system is read-only", _PLACE, BAD_INPUT),
    errno.ENOTDIR: ("a part of the path is a file, not a directory", "pass a path under a directory", BAD_INPUT),
    errno.EEXIST: ("a part of the path is a file, not a directory", "pass a path under a directory", BAD_INPUT),
    errno.EISDIR: ("it is a directory", "pass a file path", BAD_INPUT),
    errno.ENOSPC: ("the disk is full", "free some space and run the same command again (finished parts are kept)",
                   FAILED_RUN),
    errno.EDQUOT: ("the disk quota is exceeded", "free some space and run the same command again", FAILED_RUN),
}


def os_error(e: OSError, path: str | Path, fix: str | None = None) -> TreeoptError:
    """One line for an OSError met while writing `path`: the file, the problem and the fix."""
    other = (e.strerror or (str(e).splitlines() or [type(e).__name__])[0], "check the path and the disk, then run again",
             FAILED_RUN)
    problem, default_fix, code = _OS_PROBLEMS.get(e.errno, other)
    blocker = _file_in_the_way(Path(path))
    if blocker is not None:
        problem = f"{blocker} is a file, not a directory"
    return TreeoptError(f"cannot write {path}: {problem}: {fix or default_fix}", code)


def _file_in_the_way(path: Path) -> Path | None:
    """The first existing ancestor of `path` when it is not a directory (`--output FILE/x`), else None."""
    for parent in path.parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def check_writable(path: str | Path, directory: bool = False, fix: str | None = None) -> Path:
    """Fail now, in one line, when `path` (a file, or with `directory` a directory) cannot be written:
    call it before loading a model or measuring anything. Creates nothing (a probe file comes and goes)."""
    path = Path(path)
    if directory and path.exists() and not path.is_dir():
        raise TreeoptError(f"cannot write into {path}: it is a file, not a directory: {fix or 'pass a directory path'}")
    if not directory and path.is_dir():
        raise TreeoptError(f"cannot write {path}: it is a directory: {fix or 'pass a file path'}")
    base = path if directory else path.parent
    existing = next(p for p in (base, *base.parents) if p.exists())  # '.' or '/' at the latest
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "Not a directory", str(existing))
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".treeopt-probe.")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise os_error(e, path, fix) from None
    return path


def atomic_write(path: str | Path, write) -> Path:
    """Call write(tmp_path) on a temporary file beside `path`, then rename it onto `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    except OSError as e:
        raise os_error(e, path) from None
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise os_error(e, path) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: Path(p).write_text(text))

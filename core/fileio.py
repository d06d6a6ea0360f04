"""Writing files so that readers never see half of one, and nothing a user made is lost.

Every writer goes through `atomic_write`, which turns an OSError (a read-only place, a file where a
directory should be, a full disk) into one TreeoptError line; `check_writable` asks the same question
up front, before a model is loaded or anything measured; `locked` keeps a second writer out of a run
directory while one writes it."""

from __future__ import annotations

import errno
import fcntl
import functools
import inspect
import os
import sys
import tempfile
from contextlib import contextmanager
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


LOCK = ".lock"
_held: dict[Path, int] = {}  # directories this process has locked -> how many times (nested holds)


@contextmanager
def locked(directory: str | Path, command: str | None = None):
    """Hold `directory`/.lock (fcntl.flock) while writing a run directory: a second writer, in another
    process, gets a one-line error naming the first (its pid and command). The kernel drops the lock
    when its holder exits, however it dies, so a leftover .lock never blocks a rerun; the file is
    removed on release (and the directory, when it was made for the lock and is still empty). Nested
    holds of one directory in one process are allowed. `command` defaults to this process's argv."""
    directory = Path(directory).absolute()
    if int(os.environ.get("RANK", "0") or 0) > 0:  # a launch's other processes (torchrun, accelerate) share rank 0's
        yield directory
        return
    if directory in _held:
        _held[directory] += 1
        try:
            yield directory
        finally:
            _held[directory] -= 1
        return
    check_writable(directory, directory=True, fix="pass another output directory")
    made = not directory.exists()
    path = directory / LOCK
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = _acquire(path)
    except OSError as e:
        raise os_error(e, path, "pass another output directory") from None
    if fd is None:
        raise TreeoptError(f"{directory} is being written by another run ({_holder(path)}): wait for it to finish, "
                           "or pass another output directory")
    who = f"pid {os.getpid()}: {command or ' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}"
    os.ftruncate(fd, 0)
    os.write(fd, (who + "\n").encode())
    _held[directory] = 1
    try:
        yield directory
    finally:
        del _held[directory]
        try:
            os.unlink(path)  # still ours: a writer that opened it meanwhile sees it gone and retries
        except OSError:
            pass
        os.close(fd)
        if made:
            try:
                directory.rmdir()  # only when empty: nothing was written
            except OSError:
                pass


def _acquire(path: Path) -> int | None:
    """An fd holding an exclusive flock on `path` (the file at that path now), or None when another holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:  # its holder removed it between our open and flock
            same = False
        if same:
            return fd
        os.close(fd)


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "pid unknown"
    except OSError:
        return "pid unknown"


def locking(where: str):
    """Decorate a function that writes a run directory: each call holds `locked` on the directory its
    argument `where` names ("out", or "config.out" for an attribute of one); none when that is None."""
    def decorate(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def run(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            name, *attrs = where.split(".")
            directory = bound.arguments[name]
            for attr in attrs:
                directory = getattr(directory, attr, None) if directory is not None else None
            if directory is None:
                return fn(*args, **kwargs)
            with locked(directory):
                return fn(*args, **kwargs)

        return run

    return decorate

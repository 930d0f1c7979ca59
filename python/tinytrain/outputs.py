"""Writing what tinytrain produces without harming what the path already names.

Every output goes through here. The rules, checked before any long work starts (`check_file`,
`check_folder`) and again when writing:
- a target that exists must be a regular file (a bundle: a folder); a device node, a FIFO, a folder
  where a file is expected, or a symlink is refused, never replaced;
- the folder it goes into must already exist and be writable (a typo in ``-o`` does not create a
  path);
- a replaced file keeps its permission bits; a new one gets what the umask gives;
- the write is atomic: a reader, a crash or a power cut sees the old file or the new one. Temporary
  files carry the writer's process id, so a later write into the same folder removes those of a
  writer that died between writing and renaming;
- a bundle folder is built whole beside the target and swapped in with one rename (Linux's
  ``renameat2(RENAME_EXCHANGE)``), so it never mixes old and new files.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import shutil
import stat
import tempfile
from typing import Iterable, Mapping, Optional, Union

from .errors import OutputPathError

PathLike = Union[str, os.PathLike]

_TEMP_PREFIX = ".tinytrain-"
_TEMP_NAME = re.compile(r"^\.tinytrain-(\d+)-.*\.(tmp|old)$")


def _describe(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symlink")):
        if test(mode):
            return name
    return "not a regular file"


def _check_parent(path: str, what: str) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise OutputPathError(f"{what} {path}: folder {folder} does not exist (create it first)", path)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputPathError(f"{what} {path}: folder {folder} is not writable", path)
    return folder


def _existing(path: PathLike, what: str, kind: str):
    """The path as a string and what stands there now (``None`` for nothing); a symlink is refused."""
    path = os.fspath(path)
    if not path:
        raise OutputPathError(f"{what}: empty path", path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None and stat.S_ISLNK(st.st_mode):
        raise OutputPathError(f"{what} {path} is a symlink; tinytrain does not replace or follow it: "
                              f"name the {kind} it points to ({os.path.realpath(path)})", path)
    return path, st


def check_file(path: PathLike, what: str = "output") -> str:
    """Refuses, before any work, a file output that could not be written safely; returns the path."""
    path, st = _existing(path, what, "file")
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise OutputPathError(f"{what} {path} exists and is {_describe(st.st_mode)}, not a regular file: "
                              f"choose another path", path)
    _check_parent(path, what)
    return path


def check_folder(path: PathLike, what: str = "output folder", allowed: Optional[Iterable[str]] = None) -> str:
    """Refuses, before any work, a folder output that could not be replaced safely. ``allowed`` lists
    the names the folder may already hold (a bundle's own files); anything else is the user's and the
    folder is not ours to swap out."""
    path, st = _existing(path, what, "folder")
    if st is not None and not stat.S_ISDIR(st.st_mode):
        raise OutputPathError(f"{what} {path} exists and is {_describe(st.st_mode)}, not a folder", path)
    _check_parent(path.rstrip(os.sep) or path, what)
    if st is not None and allowed is not None:
        foreign = sorted(n for n in os.listdir(path) if n not in set(allowed) and not _TEMP_NAME.match(n))
        if foreign:
            shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
            raise OutputPathError(f"{what} {path} holds files that are not the bundle's ({shown}): "
                                  f"export into an empty or new folder", path)
    return path


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(folder: str) -> None:
    """Removes the temporary files and folders a tinytrain writer left in ``folder`` when it died
    between writing and renaming (its process is gone)."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        m = _TEMP_NAME.match(name)
        if m is None or _alive(int(m.group(1))):
            continue
        full = os.path.join(folder, name)
        try:
            if os.path.isdir(full) and not os.path.islink(full):
                shutil.rmtree(full)
            else:
                os.unlink(full)
        except OSError:
            pass


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)  # no /proc: read it by setting it (restored at once)
    os.umask(old)
    return old


def _fsync_folder(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: PathLike, data: Union[bytes, str], what: str = "output") -> str:
    """Writes ``data`` to ``path`` under the rules above; returns the path."""
    path = check_file(path, what)
    folder = _check_parent(path, what)
    clean_stale(folder)
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mode = 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(prefix=f"{_TEMP_PREFIX}{os.getpid()}-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        # Checked again at the last moment: the path may have become something else meanwhile.
        check_file(path, what)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_folder(folder)
    return path


def _exchange(a: str, b: str) -> bool:
    """Swaps two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where not available."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    rc = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return rc == 0


def write_folder_atomic(path: PathLike, files: Mapping[str, bytes], what: str = "output folder") -> str:
    """Writes a folder holding exactly ``files`` (name -> bytes) in place of ``path``: built whole
    beside it, then swapped in, so readers see the old folder or the new one."""
    path = check_folder(path, what, allowed=files.keys())
    parent = os.path.dirname(os.path.abspath(path.rstrip(os.sep) or path))
    clean_stale(parent)
    new = tempfile.mkdtemp(prefix=f"{_TEMP_PREFIX}{os.getpid()}-", suffix=".tmp", dir=parent)
    try:
        os.chmod(new, 0o777 & ~_umask())
        for name, data in files.items():
            with open(os.path.join(new, name), "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(os.path.join(new, name), 0o666 & ~_umask())
        _fsync_folder(new)
        check_folder(path, what, allowed=files.keys())
        if not os.path.exists(path):
            os.rename(new, path)
        elif _exchange(new, path):
            shutil.rmtree(new)  # now holds the old bundle
        else:
            # No atomic exchange here: move the old folder aside first; a crash between the two
            # renames leaves both as hidden folders that the next write removes.
            old = f"{new[:-len('.tmp')]}.old"
            os.rename(path, old)
            os.rename(new, path)
            shutil.rmtree(old)
    except BaseException:
        if os.path.isdir(new):
            shutil.rmtree(new, ignore_errors=True)
        raise
    _fsync_folder(parent)
    return path


# The CLI's output options: files, and folders it creates itself (the demo's and the fleet's
# working folders, the firmware bundle).
_FILE_OPTIONS = ("output", "plot", "onnx")
_FOLDER_OPTIONS = ("mcu",)


def check_cli_outputs(args) -> None:
    """Checks every output a parsed command line names before the command does any work."""
    for name in _FILE_OPTIONS:
        value = getattr(args, name, None)
        if isinstance(value, str) and value:
            check_file(value, f"--{name}")
    for name in _FOLDER_OPTIONS:
        value = getattr(args, name, None)
        if isinstance(value, str) and value:
            check_folder(value, f"--{name}")

"""What this machine offers the rest of the project: usable cores, the cache folder, atomic file writes, checks of
output paths, whether progress bars go to a terminal. (How the command-line tools start and end: common/cli.py.)"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import re
import shutil
import stat
import sys
import textwrap
from pathlib import Path

from odir_dual.common.errors import OdirError, printable


def usable_cores() -> int:
    """Cores this process may run on (containers, taskset), not the host's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse instead of handing it back to the kernel. Why: a CPU training
    step allocates and frees activations of tens to hundreds of MB; glibc serves each block above its mmap threshold
    (32 MB at most) with a fresh mmap and unmaps it when freed, so every step faults its pages in again, each zeroed
    by the kernel: the cpu preset's 3-fold run spent 2,842 of its 8,242 CPU seconds in the kernel (1.6e9 page
    faults). With no mmap and no trimming the heap keeps them; the process keeps its peak memory until it exits.

    Returns whether it was applied: Linux with glibc only, and not when the user tunes malloc (MALLOC_MMAP_MAX_,
    GLIBC_TUNABLES)."""
    if not sys.platform.startswith("linux") or {"MALLOC_MMAP_MAX_", "GLIBC_TUNABLES"} & set(os.environ):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and other C libraries
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def driver_gpu_count() -> int:
    """GPUs the CUDA driver sees (cuInit + cuDeviceGetCount through libcuda); 0 without a driver. Asks without torch
    (the light scoring install has none; train.py's --help must not wait for it)."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def cache_root() -> Path:
    """Where prepared images and the synthetic demo set live: $ODIR_CACHE, else ~/.cache/odir-dual."""
    return Path(os.environ.get("ODIR_CACHE", Path.home() / ".cache" / "odir-dual")).expanduser()


@contextlib.contextmanager
def atomic_write(path, mode: str = "w", **open_kwargs):
    """Open a temporary file beside `path`; on success fsync and rename it over `path`, on any error remove it.

    A kill at any moment leaves the old file or the new one, never a half-written one, and no temporary file
    outlives a failed write. `mode` is "w" (text) or "wb"; `open_kwargs` go to `open` (newline, encoding, ...).

        with atomic_write(run_dir / "metrics.csv", newline="") as f:
            csv.writer(f).writerows(rows)
    """
    path = Path(path)
    tmp = temporary_path(path, "tmp", f"-{os.urandom(3).hex()}")
    try:
        with open(tmp, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        _check_replaceable(path)  # again at the end: a device or FIFO put there meanwhile is never replaced
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None and e.errno:  # a failed write (disk full) names no file
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


class OutputError(OdirError, ValueError):
    """An output path that must not be written (a device, FIFO, folder, link, or one of the inputs); the message
    names the flag and the path."""


def _check_replaceable(path: Path) -> None:
    """Raise OutputError unless `path` is absent or a regular file (never a link, device, FIFO, socket or folder)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise OutputError(f"{printable(path)}: cannot be checked ({e.strerror or e})") from None
    if stat.S_ISREG(st.st_mode):
        return
    kind = ("a symbolic link (write to the file it points to by its own path)" if stat.S_ISLNK(st.st_mode) else
            "a folder" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode) else
            "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else
            "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
    raise OutputError(f"{printable(path)}: is {kind}, not a regular file; not replacing it")


def check_output(path, flag: str, inputs=()) -> Path:
    """Check an output path that the user named, before any work: it is absent or a regular file (a device such as
    /dev/null, a FIFO, a folder or a symbolic link is refused: the file is written to a temporary file beside it and
    renamed over it, which would replace the device or the link itself), and it is none of `inputs`
    ((what, path) pairs: the model, the checkpoint, an input image), also through another name (a hard link).

    Raises:
        OutputError: "FLAG PATH: why", naming the input it would overwrite.
    """
    path = Path(path)
    try:
        _check_replaceable(path)
    except OutputError as e:
        raise OutputError(f"{flag} {e}") from None
    try:  # a folder where the file cannot be created fails now, not after the work
        check_can_create(path)
    except OSError as e:
        raise OutputError(f"{flag} {printable(path)}: cannot be written there ({e.strerror})") from None
    target, where = _identity(path), os.path.abspath(path)
    for what, other in inputs:
        if other is None:
            continue
        # an absent output can only equal an input by name; an existing one also through a hard link or a link
        if os.path.abspath(other) == where or (target is not None and target == _identity(Path(other))):
            raise OutputError(f"{flag} {printable(path)}: is the {what} ({printable(other)}); writing there would "
                              f"destroy it: choose another path")
    return path


def check_can_create(path) -> None:
    """OSError naming `path` when it could not be created: its nearest existing parent folder is on a read-only file
    system or not writable. Creates nothing (a refused command leaves no folder behind)."""
    first = Path(os.path.abspath(path))  # the first thing to create: named in the error, as mkdir would
    parent = first.parent
    while not parent.exists() and parent != parent.parent:
        first, parent = parent, parent.parent
    if not parent.is_dir():
        raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(parent))
    read_only = False
    with contextlib.suppress(AttributeError, OSError):  # no statvfs (Windows): the access check below, mkdir later
        read_only = bool(os.statvfs(parent).f_flag & os.ST_RDONLY)
    if read_only:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(first))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OSError(errno.EACCES, os.strerror(errno.EACCES), str(first))


OUTPUT_MARKER = ".odir-output"  # in every output folder a tool created: it may write there again


def check_output_folder(path, flag: str) -> None:
    """An output folder that the tool fills with many files (score.py --report): absent (and creatable), empty, or
    one that a tool of this project created (`OUTPUT_MARKER`); a folder holding anything else is the user's, never
    overwritten file by file. Writes nothing.

    Raises:
        OutputError: "FLAG PATH: why"."""
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise OutputError(f"{flag} {printable(path)}: exists and is not a folder; give a folder")
    if not path.exists():
        check_can_create(path)
        return
    entries = sorted(p.name for p in path.iterdir())
    if entries and OUTPUT_MARKER not in entries:
        shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
        raise OutputError(f"{flag} {printable(path)}: a folder this project did not create, holding {shown}; not "
                          "writing into it: give a new or empty folder")


@contextlib.contextmanager
def output_folder(path, flag: str):
    """Claim an output folder (`check_output_folder` first), marked as ours, and yield it; if the body fails, a
    folder created here is removed again with everything written into it (a folder that existed is left)."""
    path = Path(path)
    check_output_folder(path, flag)
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    try:
        (path / OUTPUT_MARKER).write_text("written by odir-dual (score.py --report): it may write here again\n")
        yield path
    except BaseException:
        if created:
            shutil.rmtree(path, ignore_errors=True)
        raise


def _identity(path: Path):
    """(device, inode) of an existing file, following links; None if absent."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


_TEMPORARY = re.compile(r"^\..+\.(tmp|checking)(\d+)(?:-[0-9a-f]{6}|\.onnx)?$")  # atomic_write's, export.py's


def temporary_path(path, kind: str = "tmp", suffix: str = "") -> Path:
    """A temporary file's path beside `path`: `.{hash of the name}.{kind}{pid}{suffix}`, short and of fixed length
    whatever the name (a legal 251-byte name plus `.tmp1234-abcdef` would pass the 255-byte limit); the pid tells
    `remove_stale_temporaries` whether its writer is gone. `kind`: "tmp" (atomic_write's) or "checking" (an
    export under check)."""
    path = Path(path)
    digest = hashlib.sha256(os.fsencode(path.name)).hexdigest()[:12]
    return path.with_name(f".{digest}.{kind}{os.getpid()}{suffix}")


def is_temporary(name: str) -> bool:
    """Whether a file name is one of our temporaries (`atomic_write`'s, export.py's ONNX file under check)."""
    return _TEMPORARY.match(name) is not None


def remove_stale_temporaries(folder, kinds=("tmp", "checking")) -> list[str]:
    """Delete the temporary files in `folder` left by a process that is gone (a kill -9 in the middle of
    `atomic_write`: no `finally` runs then). Only for folders that one process at a time writes (a locked run
    folder): the owner is told by the pid in the name, which means nothing on another host. `kinds`: which
    temporaries ("tmp": atomic_write's, "checking": export.py's ONNX files under check). Returns their names."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = _TEMPORARY.match(entry.name)
        if m and m[1] in kinds and not _alive(int(m[2])):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
                removed.append(entry.name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def write_text_atomic(path, text: str) -> None:
    """`Path.write_text`, atomically (see `atomic_write`)."""
    with atomic_write(path) as f:
        f.write(text)


def wrap(text: str, width: int = 110) -> str:
    """Each line of `text` that is wider than `width` wrapped at spaces, continued with a 2-space indent; words
    (paths, commands) are never broken, so they stay copyable."""
    return "\n".join(textwrap.fill(line, width, subsequent_indent="  ", break_long_words=False,
                                    break_on_hyphens=False) if len(line) > width else line
                      for line in str(text).split("\n"))


def wrapped(log):
    """`log` (print, a logger's method) with every message passed through `wrap`."""
    return lambda text="", *args, **kwargs: log(wrap(text), *args, **kwargs)


def progress_enabled() -> bool:
    """Progress bars only on a terminal: a redirected log gets the result lines, not carriage returns."""
    return sys.stderr.isatty()

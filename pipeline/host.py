"""What this machine offers the rest of the project: usable cores, the cache folder, atomic file writes."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path


def usable_cores() -> int:
    """Cores this process may run on (containers, taskset), not the host's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


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
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}-{os.urandom(3).hex()}")
    try:
        with open(tmp, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path, text: str) -> None:
    """`Path.write_text`, atomically (see `atomic_write`)."""
    with atomic_write(path) as f:
        f.write(text)

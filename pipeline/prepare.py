"""Prepare every fundus photograph once: crop the round fundus out of its black border, resize, re-encode.

Training and scoring read the prepared copy, never the originals: an original costs tens of ms to decode, a
prepared copy a few (docs/DALI-NOTES.md, "Speed facts"). Every image is fully decoded here, so this is where bad
images are found and reported (`BadImage`). JPEG draft mode decodes at 1/2, 1/4 or 1/8 scale when the fundus stays
at least `short_px` on its short side.

Cache: `cache_dir/{short_px}px/{hash32}.jpg` (hash of the absolute source path: a fixed-length name, so any legal
source name works), up to date while its `.src` file matches the source's size, mtime, ctime and inode, and the
settings it records match this module's (why these: docs/DESIGN-NOTES.md; the folder's SETTINGS file shows them to
a reader). Each entry records its own, so a run killed half-way keeps what it prepared. The `.src` file also records
the source's content hash (sha256), which binds a run to the very photographs it was trained on (`source_hash`).

    python -m pipeline.prepare --data DIR [--cache-dir DIR] [--short-px 384] [--workers N]
"""
from __future__ import annotations

import argparse
import hashlib
import io
import multiprocessing as mp
import os
import re
import select
import signal
import stat
import sys
import threading
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from odir_dual.common.cli import run_cli
from odir_dual.common.errors import OdirError
from odir_dual.pipeline.host import atomic_write, cache_root, progress_enabled, usable_cores, write_text_atomic

if TYPE_CHECKING:  # pandas is imported lazily: worker processes never need it (~0.4 s less start-up each)
    import pandas as pd

BRIGHT_THRESHOLD = 20  # channel max (0-255) above which a pixel counts as fundus, not border
MIN_LINE_FRACTION = 0.1  # a row/column belongs to the fundus if it has >= 10% of the bright pixels of the fullest one
MIN_FUNDUS_FRACTION = 0.05  # the bright box's short side must be >= 5% of the image's: a text label alone is no fundus
# A fundus region (and so the prepared image) may be at most 3x as long as it is wide: ODIR photographs are 1-1.5:1;
# a long strip is no fundus, and resized to the short side it would need an enormous image (a 200000x2 PNG).
MAX_ASPECT = 3
JPEG_QUALITY = 95
JPEG_SUBSAMPLING = "4:2:0"  # libjpeg's default at q95; smaller and faster to decode than 4:4:4
# LANCZOS: on the <2x reduction left after draft decoding it lands 0.3-1.3 dB PSNR closer to a full-resolution
# LANCZOS reference than BICUBIC and 1.5-5 dB closer than BILINEAR, for ~10% of throughput at 384 px and ~25% at
# 512 px versus BILINEAR (2592x1944 synthetic fundi, AMD EPYC; benchmarks/prepare.py). Preparation runs once.
RESAMPLE = Image.Resampling.LANCZOS
# Only matters where no draft scaling happened (PNG, or an image already near short_px): box-reduce by an integer
# factor first while the remaining factor stays >= 2, the same trade as the JPEG draft itself.
REDUCING_GAP = 2.0
DRAFT_SCALES = (8, 4, 2)  # the reductions libjpeg's DCT scaling offers (besides 1)
PREPARE_VERSION = 1  # bump when the algorithm changes in a way the settings below do not show
CHUNK = 4  # images per worker task: amortises inter-process overhead, keeps the progress bar smooth
IN_FLIGHT_PER_WORKER = 4  # chunks queued per worker: enough to keep workers busy, memory stays flat
MIN_POOL_IMAGES = 32  # fewer images to do: prepare in-process (a pool takes ~1 s to start; 32 images take ~1 s)


class BadImage(OdirError):
    """An image that cannot be prepared. `reason` is a short human string ('missing file', 'truncated JPEG', ...).

    Mostly an internal signal: `prepare_table` records it as the eye's reason and goes on with the other images;
    it reaches a user as such only from serve.py (an uploaded photograph) or a direct `prepare_image` call."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class CacheError(OdirError, RuntimeError):
    """The prepared copy cannot be written (disk full, permissions): a problem of the cache, not of the image;
    the message names the source and the cache file."""


# ----------------------------------------------------------------------------------------------------------------
# One image


def cache_path(src: str | os.PathLike, cache_dir: str | os.PathLike, short_px: int) -> Path:
    """Where the prepared copy of `src` lives: `cache_dir/{short_px}px/{hash of the absolute path}.jpg`, 32 hex
    digits whatever the source's name (a 251-byte name plus our suffixes would pass the 255-byte limit), plain
    ASCII (readers that need UTF-8, DALI, open it whatever bytes the source name holds)."""
    src = os.path.abspath(os.fspath(src))
    digest = hashlib.sha256(src.encode("utf-8", "surrogateescape")).hexdigest()[:32]
    return Path(cache_dir) / f"{short_px}px" / f"{digest}.jpg"


def source_identity(st: os.stat_result) -> str:
    """What a source file is, from one stat: size, mtime_ns, ctime_ns, inode (docs/DESIGN-NOTES.md says why)."""
    return f"size={st.st_size} mtime_ns={st.st_mtime_ns} ctime_ns={st.st_ctime_ns} inode={st.st_ino}\n"


def identity_path(dst: str | os.PathLike) -> Path:
    """The file beside a prepared copy that records its source's identity and content hash: `{hash32}.src`."""
    return Path(dst).with_suffix(".src")


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes (hex), read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _recorded(dst) -> tuple[str, str | None, str]:
    """(the identity line, the sha256 or None, the settings digest or "") that the `.src` file beside a prepared
    copy records."""
    first, *rest = identity_path(dst).read_text().split("\n")
    fields = dict(line.partition("=")[::2] for line in rest if "=" in line)
    digest = fields.get("sha256", "").strip()
    # a record cut short by a crash holds a partial hash or settings digest: the entry counts as stale
    return first + "\n", digest if re.fullmatch(r"[0-9a-f]{64}", digest) else None, fields.get("settings", "")


def source_hash(dst: str | os.PathLike) -> str:
    """The sha256 of the source a prepared copy was made from, as recorded when it was prepared (no source read).

    Raises:
        CacheError: the record is gone or has no hash (the cache was changed meanwhile)."""
    try:
        digest = _recorded(dst)[1]
    except (OSError, UnicodeDecodeError) as e:
        raise CacheError(f"{identity_path(dst)}: cannot be read ({e}); the cache changed meanwhile: run again") \
            from None
    if digest is None:
        raise CacheError(f"{identity_path(dst)}: records no content hash; the cache changed meanwhile: run again")
    return digest


def is_up_to_date(src: str | os.PathLike, dst: str | os.PathLike) -> bool:
    """True if `dst` exists and was prepared from `src` as it is now (same size, mtime, ctime and inode: no
    decoding, no reading of src) with today's settings. An entry without its identity file, content hash or
    settings digest (older caches, a record cut short) is stale. Each entry records its own settings, so a run
    killed half-way keeps what it prepared."""
    try:
        if os.stat(dst).st_size == 0:
            return False
        identity, digest, settings = _recorded(dst)
        return digest is not None and settings == _settings_digest() and identity == source_identity(os.stat(src))
    except (OSError, UnicodeDecodeError):
        return False


def fundus_box(img: Image.Image, threshold: int = BRIGHT_THRESHOLD, min_fraction: float = MIN_LINE_FRACTION,
               symmetric: bool = True) -> tuple[int, int, int, int]:
    """Bounding box (left, top, right, bottom) of the fundus: the pixels whose channel max exceeds `threshold`.

    Robust to sensor noise and text labels in the black border: a row (column) counts only if it holds at least
    `min_fraction` of the bright pixels of the fullest row (column), and of the runs of such rows (columns) the one
    holding most bright pixels wins, so a label separated from the fundus by dark rows/columns is left out. Each
    axis is then recounted inside the other's band, so a label beside the fundus does not widen the box.
    With `symmetric` (default) the box is widened to be symmetric about the frame centre, which keeps a fundus's
    dark side. An image with no dark border gives the whole image.

    Raises:
        BadImage: the image is black, or its bright region is too small to be a fundus.
    """
    a = np.asarray(img if img.mode in ("RGB", "L") else img.convert("RGB"))
    # np.maximum over the three planes is ~10x faster than a.max(axis=2) (a reduction over a 3-wide inner axis)
    chan_max = np.maximum(np.maximum(a[..., 0], a[..., 1]), a[..., 2]) if a.ndim == 3 else a  # (H, W)
    mask = (chan_max > threshold).view(np.uint8)  # (H, W) 0/1; uint8 sums with an int32 accumulator are 2x faster
    h, w = mask.shape
    rows, cols = mask.sum(axis=1, dtype=np.int32), mask.sum(axis=0, dtype=np.int32)  # (H,), (W,)
    if rows.max(initial=0) == 0:
        raise BadImage("no fundus found (image is black)")
    r0, r1 = _main_run(rows, min_fraction)
    c0, c1 = _main_run(cols, min_fraction)
    # refine each axis inside the other's band: ignores labels beside (rows) or above/below (columns) the fundus
    r0b, r1b = _main_run(mask[:, c0:c1].sum(axis=1, dtype=np.int32), min_fraction)
    c0b, c1b = _main_run(mask[r0:r1].sum(axis=0, dtype=np.int32), min_fraction)
    bw, bh = c1b - c0b, r1b - r0b
    if min(bw, bh) < max(2, MIN_FUNDUS_FRACTION * min(w, h)):
        raise BadImage(f"no fundus found (bright region {bw}x{bh} px in {w}x{h})")
    if not symmetric:
        return c0b, r0b, c1b, r1b
    # Fundus cameras centre the field of view in the frame, and real fundi often have a dark side (under-exposed,
    # cataract) whose pixels stay below the threshold: a plain box would cut it off, optic disc included (ODIR
    # 2917_left, 2133_right). Union with its mirror image about the frame centre: never cuts more than the plain
    # box, keeps the dark side; an off-centre fundus only keeps some extra border.
    return min(c0b, w - c1b), min(r0b, h - r1b), max(c1b, w - c0b), max(r1b, h - r0b)


def _main_run(counts: np.ndarray, min_fraction: float) -> tuple[int, int]:
    """[start, end) of the run of lines with >= min_fraction * max(counts) that holds the most bright pixels."""
    peak = counts.max(initial=0)
    if peak == 0:
        return 0, 0
    ok = counts >= max(1.0, min_fraction * peak)
    edges = np.diff(np.concatenate(([0], ok.astype(np.int8), [0])))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    cum = np.concatenate(([0], np.cumsum(counts, dtype=np.int64)))
    best = int(np.argmax(cum[ends] - cum[starts]))
    return int(starts[best]), int(ends[best])


def crop_fundus(img: Image.Image) -> Image.Image:
    """The fundus cropped out of its dark border (see `fundus_box`); an image with no dark border comes back whole.

    Raises:
        BadImage: the image is black or holds no fundus-sized bright region.
    """
    box = fundus_box(img)
    return img if box == (0, 0, img.width, img.height) else img.crop(box)


def _check_file(src: Path) -> os.stat_result:
    try:
        st = os.stat(src)
    except FileNotFoundError:
        raise BadImage("missing file") from None
    except OSError as e:
        raise BadImage(f"unreadable file: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise BadImage("not a regular file")
    if st.st_size == 0:
        raise BadImage("empty file")
    return st


def _draft_scale(width: int, height: int, short_px: int) -> int:
    """Largest DCT reduction k in (8, 4, 2) that leaves the UNCROPPED short side >= short_px, else 1.

    Arithmetic: libjpeg decodes at ceil(side / k), and the crop can only shrink the image, so `short // k >=
    short_px` is necessary (never an upscale because of the draft) but not sufficient: `_decode_fundus` measures
    the cropped short side afterwards and decodes again at a finer scale if it fell below short_px. ODIR fundi
    nearly fill the short side, so the first guess almost always stands. Example, 2592x1944 -> 384 px: k=4 gives
    648x486; the fundus must span >= 4 * 384 = 1536 original px (79% of 1944), else we redo at k=2 (972 px).
    k=8 would give 243 px < 384.
    """
    short = min(width, height)
    return next((k for k in DRAFT_SCALES if short // k >= short_px), 1)


def _decode(src: Path, short_px: int, max_k: int) -> tuple[Image.Image, int]:
    """Fully decode `src` to RGB, a JPEG at the reduction `_draft_scale` picks (at most max_k).

    Returns (image, reduction actually applied: 1, 2, 4 or 8).
    """
    try:
        with Image.open(src) as im:
            fmt, full_w = im.format or "image", im.width
            k = min(max_k, _draft_scale(im.width, im.height, short_px)) if im.format == "JPEG" else 1
            if k > 1:
                im.draft("RGB", (im.width // k, im.height // k))
            try:
                im.load()  # decodes everything: truncation and corrupt streams surface here, not later
            except OSError as e:
                if "truncated" in str(e):
                    raise BadImage(f"truncated {fmt}") from None
                raise BadImage(f"corrupt image: {e}") from None
            applied = max(1, round(full_w / im.width))
            try:
                if im.getexif().get(0x0112, 1) not in (0, 1):  # EXIF orientation: apply it (rare; no copy otherwise)
                    im = ImageOps.exif_transpose(im)
            except Exception:  # noqa: BLE001 - a broken EXIF block is no reason to reject good pixels
                pass
            return _to_rgb(im), applied
    except UnidentifiedImageError:
        raise BadImage("not an image") from None
    except BadImage:
        raise
    except Exception as e:  # noqa: BLE001 - any decoder failure is a bad image, never a crash of the whole run
        raise BadImage(f"corrupt image: {type(e).__name__}: {e}") from None


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB from any mode: L and CMYK (Adobe-inverted included) via PIL, 16-bit/float scaled, alpha onto black."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        a = np.asarray(im, dtype=np.float32)
        a = a / 257.0 if a.max(initial=0) > 255 else a  # 16-bit range -> 8-bit
        return Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if "A" in im.getbands() or im.mode in ("RGBa", "La"):
        rgba = im.convert("RGBA")
        out = Image.new("RGB", im.size)  # transparent pixels become black border
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return im.convert("RGB")


def _decode_fundus(src: Path, short_px: int) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """Decode at the coarsest scale where the fundus box's short side is still >= short_px. Returns (image, box)."""
    max_k = DRAFT_SCALES[0]
    while True:
        img, k = _decode(src, short_px, max_k)
        box = fundus_box(img)
        box_short = min(box[2] - box[0], box[3] - box[1])  # decoded pixels
        if box_short >= short_px or k == 1:
            return img, box
        # The fundus spans ~box_short * k original pixels: take the largest reduction that keeps it >= short_px
        # (1 if none does) and decode again. Costs one extra decode, only for fundi much smaller than the frame.
        span = box_short * k
        max_k = next((s for s in DRAFT_SCALES if s < k and span // s >= short_px), 1)


def _output_size(box: tuple[int, int, int, int], short_px: int) -> tuple[int, int]:
    bw, bh = box[2] - box[0], box[3] - box[1]
    if bw <= bh:
        return short_px, max(short_px, round(bh * short_px / bw))
    return max(short_px, round(bw * short_px / bh)), short_px


class _StrictTruncation:
    """Decode with ImageFile.LOAD_TRUNCATED_IMAGES = False whatever the caller set: a truncated file is an error."""

    def __enter__(self):
        self.saved, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False

    def __exit__(self, *exc):
        ImageFile.LOAD_TRUNCATED_IMAGES = self.saved
        return False


def prepare_image(src: str | os.PathLike, dst: str | os.PathLike, short_px: int) -> str:
    """Crop the fundus out of `src`, resize its short side to `short_px`, write RGB baseline JPEG q95 to `dst`.

    The write is atomic (temporary file in dst's folder, then os.replace): a crash never leaves a half-written
    `dst`. No up-to-date check here; `prepare_paths` does that, with the source identity this returns.

    Args:
        src: any image PIL reads, decoded by content (a PNG named .jpg is fine); grayscale, CMYK, 16-bit and
            alpha images are converted to RGB.
        dst: output path; its folder is created if needed.
        short_px: short side of the output in pixels (the training image size).
    Returns:
        the record for the `.src` file: `source_identity` of src (taken before it was read) and its sha256.
    Raises:
        BadImage: missing, empty, unreadable, not an image, truncated, corrupt, black, blank (one flat colour),
            fundus-less input, or data that ends before the size its header states.
        OSError: dst cannot be written (a problem of the cache, not of the image).
    """
    if short_px < 1:
        raise ValueError(f"short_px must be >= 1, got {short_px}")
    src, dst = Path(src), Path(dst)
    identity = source_identity(_check_file(src))  # stat before reading: a file swapped meanwhile looks stale later
    try:  # everything done to the picture: whatever fails here is this image's problem, never the cache's
        digest = file_sha256(src)
        with _StrictTruncation():
            img, box = _decode_fundus(src, short_px)
        _check_data_fills_frame(img)
        bw, bh = box[2] - box[0], box[3] - box[1]
        if max(bw, bh) > MAX_ASPECT * min(bw, bh):  # a 7000x40 strip would become 67200x384 px (JPEG's limit: 65535)
            raise BadImage(f"not a fundus photograph (fundus region {bw}x{bh} px: sides more than {MAX_ASPECT}:1)")
        out = img.resize(_output_size(box, short_px), RESAMPLE, box=box, reducing_gap=REDUCING_GAP)
        _check_not_blank(img, out)
        encoded = io.BytesIO()  # encoded in memory first: an encoder error is not a cache-write error
        out.save(encoded, "JPEG", quality=JPEG_QUALITY, subsampling=JPEG_SUBSAMPLING, optimize=False,
                 progressive=False)
    except BadImage:
        raise
    except Exception as e:  # noqa: BLE001 - MemoryError, an encoder's OSError/ValueError, ...
        raise BadImage(f"cannot be prepared: {type(e).__name__}: {' '.join(str(e).split())[:160]}") from None
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(dst, "wb") as f:
        f.write(encoded.getbuffer())
    return f"{identity}sha256={digest}\nsettings={_settings_digest()}\n"


# A prepared copy whose pixels barely vary is no photograph: a JPEG whose header claims more pixels than its data
# holds decodes to the data's few rows and then flat grey (libjpeg fills what is missing, without an error). Real
# fundus photographs have a standard deviation of 20-60 (0-255 scale) and no flat mid-grey band.
MIN_PIXEL_STD = 2.0  # below: blank
MISSING_DATA_ROWS = 0.25  # a bottom band this high (share of the image), all one value, mid-grey: data ran out


def _check_not_blank(decoded: Image.Image, prepared: Image.Image) -> None:
    """BadImage for a prepared copy of (nearly) one flat colour."""
    std = float(np.asarray(prepared, np.float32).std())
    if std < MIN_PIXEL_STD:
        raise BadImage(f"blank: its prepared copy is one flat colour (pixel std {std:.1f} of 255; a header that "
                       f"states {decoded.width}x{decoded.height} px for less data decodes so)")


def _check_data_fills_frame(decoded: Image.Image) -> None:
    """BadImage for a decode whose data ended before the size its header states: its bottom band is one flat
    mid-grey value (what libjpeg fills in; a photograph's border is black)."""
    a = np.asarray(decoded)
    band, top = a[int(len(a) * (1 - MISSING_DATA_ROWS)):], a[:max(1, len(a) // 8)]
    if len(a) > 8 and band.min() == band.max() and 64 <= int(band.min()) <= 192 and top.min() != top.max():
        raise BadImage(f"its data ends before the {decoded.width}x{decoded.height} px its header states (the bottom "
                       f"{round(100 * MISSING_DATA_ROWS)}% decodes as flat grey): a damaged or altered file")


# ----------------------------------------------------------------------------------------------------------------
# Many images


def _prepare_chunk(items: list[tuple[str, str]], short_px: int) -> list[tuple[str, str | None, str | None]]:
    """Worker task: [(src, dst)] -> [(src, dst or None, reason or None)]."""
    results = []
    for src, dst in items:
        try:
            identity = prepare_image(src, dst, short_px)
            # Written after the image and without a temporary file: a crash in between leaves an old or partial
            # identity, which only makes the entry stale (prepared again), never a wrong image taken as current.
            identity_path(dst).write_text(identity)
            results.append((src, dst, None))
        except BadImage as e:
            results.append((src, None, e.reason))
        except Exception as e:  # a cache-side failure (disk full, permissions): stop the run, name the file
            raise CacheError(f"preparing {src} -> {dst}: {type(e).__name__}: {e}") from e
    return results


def _worker_init(parent_pid: int) -> None:
    """Pool worker set-up: leave Ctrl-C to the parent (it stops the pool), and exit as soon as the parent is gone.

    The pool's workers are children of the forkserver, not of the parent, so after a kill -9 of the parent nothing
    else would end them (docs/DESIGN-NOTES.md). A watcher thread ends the worker; the forkserver and the resource
    tracker then see their pipes close and exit too.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with, args=(parent_pid,), name="exit-with-parent", daemon=True).start()


def _exit_with(pid: int) -> None:
    try:
        fd = os.pidfd_open(pid)  # Linux >= 5.3: readable once pid has exited (zombie included)
    except (AttributeError, OSError):
        fd = None
    if fd is not None:
        select.select([fd], [], [])
    else:  # other systems, or pid already gone
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            except PermissionError:
                pass
            time.sleep(1.0)
    os._exit(1)


def _mp_context():
    # forkserver, not fork: the caller may hold threads (DALI, torch) whose locks a forked child would inherit
    method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    return mp.get_context(method)


def _run(todo: list[tuple[str, str]], short_px: int, workers: int, bar: tqdm):
    """Yield (src, dst or None, reason or None) for every item of todo, in completion order."""
    chunks = [todo[i:i + CHUNK] for i in range(0, len(todo), CHUNK)]
    workers = 1 if len(todo) < MIN_POOL_IMAGES else max(1, min(workers, len(chunks)))
    if workers == 1:  # in-process: no start-up cost, plain tracebacks; also what "images/s per core" measures
        for chunk in chunks:
            results = _prepare_chunk(chunk, short_px)
            bar.update(len(results))
            yield from results
        return
    max_in_flight = workers * IN_FLIGHT_PER_WORKER
    next_chunk = iter(chunks)
    with ProcessPoolExecutor(max_workers=workers, mp_context=_mp_context(), initializer=_worker_init,
                             initargs=(os.getpid(),)) as ex:
        pending = set()
        try:
            while True:
                # chunked submission: only max_in_flight chunks exist at a time, so 100k images stream flat
                for chunk in next_chunk:
                    pending.add(ex.submit(_prepare_chunk, chunk, short_px))
                    if len(pending) >= max_in_flight:
                        break
                if not pending:
                    return
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    results = fut.result()
                    bar.update(len(results))
                    yield from results
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise


def _settings() -> str:
    """Everything that shapes a prepared image besides its source and short_px, one line per setting."""
    return "".join(f"{k} = {v}\n" for k, v in [
        ("version", PREPARE_VERSION), ("bright_threshold", BRIGHT_THRESHOLD), ("min_line_fraction", MIN_LINE_FRACTION),
        ("symmetric_box", True), ("resample", RESAMPLE.name), ("reducing_gap", REDUCING_GAP),
        ("jpeg_quality", JPEG_QUALITY), ("jpeg_subsampling", JPEG_SUBSAMPLING)])


def _settings_digest() -> str:
    """`_settings()` in 16 hex digits: what each cache entry records about how it was made."""
    return hashlib.sha256(_settings().encode()).hexdigest()[:16]


def _is_blank(p) -> bool:
    """None, NaN, pd.NA, '' (a table's empty cell): no path to prepare."""
    return not isinstance(p, (str, os.PathLike)) or not os.fspath(p).strip()


def prepare_paths(paths: list, cache_dir: str | os.PathLike, short_px: int, workers: int | None = None,
                  progress: bool = True, *, stats: dict | None = None) -> tuple[list[str | None], list[str | None]]:
    """Prepare many images (in parallel); up-to-date cache entries are skipped without decoding.

    Args:
        paths: source image paths; duplicates are prepared once, None/NaN/'' give the reason 'no path given'.
        cache_dir: cache root; outputs go to `cache_path(src, cache_dir, short_px)`.
        short_px: output short side in pixels.
        workers: processes (default: the cores this process may use); 1 runs in this process.
        progress: show a tqdm bar ("prepare", img/s) over the images that need work.
        stats: if given, filled with counts: images (distinct sources), up_to_date, prepared, failed, seconds.
    Returns:
        (prepared, reasons), one entry per input path: the prepared file's path or None, and None or the
        BadImage reason. A bad image never stops the others.
    """
    t0 = time.perf_counter()
    n = len(paths)
    prepared: list[str | None] = [None] * n
    reasons: list[str | None] = [None] * n
    by_src: dict[str, list[int]] = {}
    for i, p in enumerate(paths):
        if _is_blank(p):
            reasons[i] = "no path given"
        else:
            by_src.setdefault(os.path.abspath(os.fspath(p)), []).append(i)
    folder = Path(cache_dir) / f"{short_px}px"
    folder.mkdir(parents=True, exist_ok=True)
    todo, up_to_date = [], 0
    for src, idx in by_src.items():
        dst = str(cache_path(src, cache_dir, short_px))
        if is_up_to_date(src, dst):
            up_to_date += 1
            for i in idx:
                prepared[i] = dst
        else:
            todo.append((src, dst))
    done = failed = 0
    with tqdm(total=len(todo), desc="prepare", unit="img",
              disable=not progress or not todo or not progress_enabled(),
              dynamic_ncols=True, mininterval=0.5) as bar:
        for src, dst, reason in _run(todo, short_px, workers or usable_cores(), bar):
            done += reason is None
            failed += reason is not None
            for i in by_src[src]:
                prepared[i], reasons[i] = dst, reason
            if failed and reason is not None:
                bar.set_postfix(failed=failed, refresh=False)
    settings_file, settings = folder / "SETTINGS", _settings()
    if not (settings_file.is_file() and settings_file.read_text() == settings):  # for a reader: how entries are made
        write_text_atomic(settings_file, settings)
    if stats is not None:
        stats.update(images=len(by_src), up_to_date=up_to_date, prepared=done, failed=failed,
                     seconds=time.perf_counter() - t0)
    return prepared, reasons


def prepare_table(patients: pd.DataFrame, cache_dir: str | os.PathLike, short_px: int, workers: int | None = None,
                  progress: bool = True, *, stats: dict | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Prepare both eyes of every patient.

    Args:
        patients: at least columns id, left, right (image paths); other columns are kept.
        cache_dir, short_px, workers, progress, stats: as for `prepare_paths`.
    Returns:
        (prepared, problems). prepared: the patients whose BOTH eyes prepared fine, same columns, left/right
        pointing to the cache files, index reset. problems: DataFrame(id, eye, path, reason), one row per failed
        eye; a patient with one bad eye is left out of prepared whole.
    """
    import pandas as pd  # slow: ~0.4 s, and the worker processes that import this module never need it

    n = len(patients)
    left, right = list(patients["left"]), list(patients["right"])
    out, reasons = prepare_paths(left + right, cache_dir, short_px, workers, progress, stats=stats)
    ok = np.array([out[i] is not None and out[n + i] is not None for i in range(n)], dtype=bool)
    prepared = patients.loc[ok].copy()
    prepared["left"] = [p for p, keep in zip(out[:n], ok) if keep]
    prepared["right"] = [p for p, keep in zip(out[n:], ok) if keep]
    ids = list(patients["id"])
    rows = [(ids[i % n], "left" if i < n else "right", (left + right)[i], r)
            for i, r in enumerate(reasons) if r is not None]
    problems = pd.DataFrame(rows, columns=["id", "eye", "path", "reason"])
    return prepared.reset_index(drop=True), problems


# ----------------------------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.prepare", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="ODIR folder: data.xlsx or full_df.csv + images")
    ap.add_argument("--cache-dir", help="prepared-image cache, the same as train.py's and score.py's; images go to "
                                        "CACHE_DIR/{short_px}px/ (default $ODIR_CACHE/prepared or "
                                        "~/.cache/odir-dual/prepared)")
    ap.add_argument("--cache", dest="cache_dir", help=argparse.SUPPRESS)  # the old spelling
    ap.add_argument("--short-px", type=int, default=384, help="short side of the prepared images, px (default 384)")
    ap.add_argument("--workers", type=int, default=None, help="processes (default: all usable cores)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    args.cache = args.cache_dir or str(cache_root() / "prepared")

    import pandas as pd  # slow: as in prepare_table

    from odir_dual.pipeline.odir import read_patients  # slow: imports pandas

    patients, missing = read_patients(args.data)
    workers = args.workers or usable_cores()
    print(f"prepare: {len(patients)} patients from {args.data} -> {Path(args.cache) / f'{args.short_px}px'} "
          f"(short side {args.short_px} px, {workers} workers)")
    stats: dict = {}
    prepared, problems = prepare_table(patients, args.cache, args.short_px, workers, not args.no_progress,
                                       stats=stats)
    rate = stats["prepared"] / stats["seconds"] if stats["seconds"] > 0 else 0.0
    speed = f" ({rate:.1f} img/s, {rate / workers:.1f} per worker)" if stats["prepared"] else ""
    print(f"images: {stats['images']} distinct; prepared {stats['prepared']}{speed}, up to date "
          f"{stats['up_to_date']}, failed {stats['failed']} in {stats['seconds']:.1f} s")
    all_problems = pd.concat([df[["id", "eye", "path", "reason"]] for df in (missing, problems) if len(df)],
                             ignore_index=True) if len(missing) or len(problems) else problems
    if len(missing):
        print(f"annotation/file problems before preparing: {len(missing)} eyes")
    for reason, count in Counter(all_problems["reason"]).most_common():
        print(f"  {count:6d}  {reason}")
    for row in all_problems.head(10).itertuples(index=False):
        print(f"    {row.id} {row.eye}: {row.reason}: {row.path}")
    if len(all_problems):
        report = Path(args.cache) / f"{args.short_px}px" / "problems.csv"
        all_problems.to_csv(report, index=False)
        print(f"  all {len(all_problems)} problems: {report}")
    print(f"patients ready: {len(prepared)} of {len(patients)} ({len(patients) - len(prepared)} left out: a bad eye)")
    return 0 if len(prepared) or not len(patients) else 1


if __name__ == "__main__":
    sys.exit(run_cli(main, "python -m pipeline.prepare",
                     interrupted="the images prepared so far are kept; run again to go on"))

"""Preparation throughput per CPU core: pipeline.prepare (JPEG draft decoding) vs a plain full decode.

Generates N synthetic ~5 MP fundus JPEGs (orange disc, texture, vessels, noise, on black), then prepares them into a
cold cache: the baseline (full decode + the same crop, resize and encode) and pipeline.prepare with 1 worker
(in-process, so images/s = images/s per core) and with all cores; then once more with everything up to date.
Prints one table with the hardware, writes the numbers to benchmarks/results/prepare.json.

    .venv/bin/python benchmarks/prepare.py
"""
from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL
from PIL import Image, ImageChops, ImageDraw, features

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import odir_dual.pipeline.prepare as P  # noqa: E402
from benchmarks.common import cpu_model  # noqa: E402

# ---------------------------------------------------------------------------------------------------- settings
N_IMAGES = 40
WIDTH_PX, HEIGHT_PX = 2592, 1944  # a common ODIR original size (5.0 MP)
SOURCE_QUALITY = 92  # JPEG quality of the synthetic originals (~1 MB each: heavier than most ODIR files)
FUNDUS_RADIUS = (0.46, 0.53)  # fundus radius as a fraction of the frame height (>= 0.5: clipped top/bottom)
SHORT_PXS = (384, 512)  # prepared short sides to time
FILTERS = ("LANCZOS", "BICUBIC", "BILINEAR")  # pipeline.prepare's RESAMPLE first, then the ones compared (1 worker)
WORKERS_ALL = None  # None: every core this process may use
# the all-cores runs prepare N_IMAGES per worker (hard links of the sources under new names, each its own cache
# entry), so every core gets as much work as the 1-worker run and the pool start-up weighs as in a real run
SEED = 0
RESULTS = Path(__file__).resolve().parent / "results" / "prepare.json"


# ---------------------------------------------------------------------------------------------------- data
def noise(rng: np.random.Generator, w: int, h: int, sigma: float) -> Image.Image:
    """Gaussian noise around 128 as an L image: a 509 px tile repeated (an odd size, so JPEG blocks never repeat),
    ~50x faster than full-size noise and just as costly to entropy-code."""
    tile = np.clip(rng.normal(128, sigma, (509, 509)), 0, 255).astype(np.uint8)
    reps = (-(-h // 509), -(-w // 509))
    return Image.fromarray(np.ascontiguousarray(np.tile(tile, reps)[:h, :w]))


def synthetic_fundus(seed: int, w: int = WIDTH_PX, h: int = HEIGHT_PX) -> Image.Image:
    """A fundus-like RGB image: shaded orange disc with smooth texture, fine noise, vessels, an optic disc."""
    rng = np.random.default_rng(seed)
    r = h * rng.uniform(*FUNDUS_RADIUS)
    cx, cy = w / 2 + rng.uniform(-0.01, 0.01) * w, h / 2 + rng.uniform(-0.01, 0.01) * h
    sw, sh = w // 8, h // 8  # shading and texture at 1/8 scale, upsampled in C
    yy, xx = np.ogrid[:sh, :sw]
    d2 = ((xx * 8 - cx) ** 2 + (yy * 8 - cy) ** 2) / r ** 2
    tex = np.asarray(Image.fromarray((rng.random((sh // 6, sw // 6)) * 255).astype(np.uint8))
                     .resize((sw, sh), Image.Resampling.BICUBIC), np.float32) / 255
    lum = np.clip(1.1 - 0.5 * d2, 0, 1) * (0.75 + 0.5 * tex) * 180  # (sh, sw)
    lum = Image.fromarray(np.clip(lum, 0, 255).astype(np.uint8)).resize((w, h), Image.Resampling.BILINEAR)
    lum = ImageChops.add(lum, noise(rng, w, h, 10), offset=-128)  # fine texture
    img = Image.merge("RGB", [lum.point(lambda v: min(255, int(v * 1.15))), lum.point(lambda v: int(v * 0.5)),
                              lum.point(lambda v: int(v * 0.18))])
    draw = ImageDraw.Draw(img)
    ox, oy = cx + rng.choice([-1, 1]) * 0.45 * r, cy  # optic disc, vessels leave from it
    draw.ellipse([ox - 0.12 * r, oy - 0.12 * r, ox + 0.12 * r, oy + 0.12 * r], fill=(250, 200, 120))
    for _ in range(14):
        x, y, a = ox, oy, rng.uniform(0, 2 * np.pi)
        pts = [(x, y)]
        for _ in range(40):
            a += rng.normal(0, 0.25)
            x, y = x + np.cos(a) * r / 25, y + np.sin(a) * r / 25
            pts.append((x, y))
        draw.line(pts, fill=(120, 30, 20), width=int(rng.uniform(4, 14)))
    mask = Image.new("L", (w, h))
    ImageDraw.Draw(mask).ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    img = Image.composite(img, Image.new("RGB", (w, h)), mask)
    sensor = noise(rng, w, h, 2)  # a little sensor noise in the black border too
    return ImageChops.add(img, Image.merge("RGB", [sensor] * 3), offset=-128)


# ---------------------------------------------------------------------------------------------------- runs
def baseline_prepare(src: str, dst: str, short_px: int) -> None:
    """The plain way: full decode, then the same crop, resize call and encode as pipeline.prepare."""
    img = Image.open(src).convert("RGB")
    box = P.fundus_box(img)
    out = img.resize(P._output_size(box, short_px), P.RESAMPLE, box=box, reducing_gap=P.REDUCING_GAP)
    out.save(dst, "JPEG", quality=P.JPEG_QUALITY, subsampling=P.JPEG_SUBSAMPLING)


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of fn()."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def psnr(a: Image.Image, b: Image.Image) -> float | None:
    if a.size != b.size:
        return None
    mse = np.mean((np.asarray(a, np.float32) - np.asarray(b, np.float32)) ** 2)
    return float(10 * np.log10(255 ** 2 / mse)) if mse > 0 else float("inf")


def main() -> None:
    workers_all = WORKERS_ALL or P._default_workers()
    hw = {"cpu": cpu_model(), "cores_usable": P._default_workers(), "cpu_count": os.cpu_count(),
          "load_avg_1min_at_start": os.getloadavg()[0], "python": platform.python_version(),
          "pillow": PIL.__version__, "libjpeg_turbo": features.version("libjpeg_turbo"), "numpy": np.__version__}
    print(f"CPU: {hw['cpu']} | cores usable: {hw['cores_usable']} (cpu_count {hw['cpu_count']}) | load avg "
          f"{hw['load_avg_1min_at_start']:.2f} | Python {hw['python']} | Pillow {hw['pillow']} "
          f"(libjpeg-turbo {hw['libjpeg_turbo']}) | numpy {hw['numpy']}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_prepare_") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        srcs = []
        for i in range(N_IMAGES):
            path = tmp / "src" / f"{i}_left.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            synthetic_fundus(SEED + i).save(path, "JPEG", quality=SOURCE_QUALITY)
            srcs.append(str(path))
        mb = np.mean([os.path.getsize(s) for s in srcs]) / 1e6
        print(f"generated {N_IMAGES} synthetic {WIDTH_PX}x{HEIGHT_PX} JPEGs (q{SOURCE_QUALITY}, {mb:.2f} MB each) "
              f"in {time.perf_counter() - t0:.1f} s; the OS file cache is warm, the prepare cache cold\n")

        many = list(srcs)
        for j in range(1, workers_all):
            for i, s in enumerate(srcs):
                link = tmp / "src" / f"{i}_copy{j}.jpg"
                os.link(s, link)
                many.append(str(link))

        def add(setting, short_px, workers, wall, cpu=None, baseline=None, images=N_IMAGES, **extra):
            """baseline: the baseline row at the same px, for the two speed-up ratios."""
            per_core = images / wall / workers
            rows.append({"setting": setting, "short_px": short_px, "workers": workers, "images": images,
                         "seconds": round(wall, 3), "images_per_s": round(images / wall, 2),
                         "images_per_s_per_core": round(per_core, 2),
                         "images_per_cpu_s": round(images / cpu, 2) if cpu else None,
                         "x_baseline_per_core": round(per_core / baseline["images_per_s_per_core"], 2)
                         if baseline else None,
                         "x_baseline_cpu": round(images / cpu / baseline["images_per_cpu_s"], 2)
                         if baseline and cpu else None, **extra})
            return rows[-1]

        decodes = []  # (reduction) per _decode call: how often the crop forced a finer second decode
        real_decode = P._decode

        def counting_decode(*a, **kw):
            img, k = real_decode(*a, **kw)
            decodes.append(k)
            return img, k

        run, base_rates = 0, {}
        for short_px in SHORT_PXS:
            run += 1
            base_dir = tmp / f"base{run}"
            base_dir.mkdir()
            bdst = [str(base_dir / f"{i}.jpg") for i in range(N_IMAGES)]
            wall, cpu = timed(lambda: [baseline_prepare(s, d, short_px) for s, d in zip(srcs, bdst)])
            base_rate = base_rates[short_px] = add(f"baseline: full decode + crop + {P.RESAMPLE.name} + q95",
                                                   short_px, 1, wall, cpu)

            decodes.clear()
            P._decode = counting_decode
            try:
                wall, cpu = timed(lambda: P.prepare_paths(srcs, tmp / f"c{run}a", short_px, workers=1,
                                                          progress=False))
            finally:
                P._decode = real_decode
            out, _ = P.prepare_paths(srcs, tmp / f"c{run}a", short_px, workers=1, progress=False)  # up to date
            q = [psnr(Image.open(o), Image.open(b)) for o, b in zip(out, bdst)]
            q = [v for v in q if v is not None]
            add("prepare (draft decode), 1 worker", short_px, 1, wall, cpu, base_rate,
                decodes_per_image=round(len(decodes) / N_IMAGES, 3),
                draft_reductions=sorted(set(decodes)), psnr_vs_baseline_db=round(float(np.mean(q)), 2) if q else None,
                psnr_compared=len(q))
            wall, _ = timed(lambda: P.prepare_paths(many, tmp / f"c{run}b", short_px, workers=workers_all,
                                                    progress=False))
            add(f"prepare (draft decode), {workers_all} workers (incl. pool start)", short_px, workers_all, wall,
                baseline=base_rate, images=len(many))

        chosen = P.RESAMPLE
        for short_px, name in [(px, name) for px in SHORT_PXS for name in FILTERS[1:]]:
            run += 1
            P.RESAMPLE = Image.Resampling[name]
            try:
                wall, cpu = timed(lambda: P.prepare_paths(srcs, tmp / f"c{run}", short_px, workers=1,
                                                          progress=False))
            finally:
                P.RESAMPLE = chosen
            add(f"prepare, resize {name} instead of {chosen.name}, 1 worker", short_px, 1, wall, cpu,
                base_rates[short_px])

        wall, _ = timed(lambda: P.prepare_paths(many, tmp / "c1b", SHORT_PXS[0], workers=workers_all,
                                                progress=False))
        add("second run, all up to date", SHORT_PXS[0], workers_all, wall, images=len(many))

    head = f"{'setting':<58} {'px':>4} {'images':>6} {'seconds':>8} {'img/s':>7} {'img/s/core':>10} " \
           f"{'img/CPU-s':>9} {'x base':>6} {'x base CPU':>10}"
    print(head)
    print("-" * len(head))
    for r in rows:
        cpu_rate = f"{r['images_per_cpu_s']:.1f}" if r["images_per_cpu_s"] else "-"
        ratio = f"{r['x_baseline_per_core']:.2f}" if r["x_baseline_per_core"] else "-"
        cpu_ratio = f"{r['x_baseline_cpu']:.2f}" if r["x_baseline_cpu"] else "-"
        print(f"{r['setting']:<58} {r['short_px']:>4} {r['images']:>6} {r['seconds']:>8.3f} {r['images_per_s']:>7.1f} "
              f"{r['images_per_s_per_core']:>10.1f} {cpu_rate:>9} {ratio:>6} {cpu_ratio:>10}")
    for r in rows:
        if "psnr_vs_baseline_db" in r:
            print(f"{r['short_px']} px: {r['decodes_per_image']} decodes/image at reductions {r['draft_reductions']}; "
                  f"output vs baseline output: {r['psnr_vs_baseline_db']} dB PSNR ({r['psnr_compared']} same-size)")
    print("img/s/core: wall clock (N-worker rows: divided by N). img/CPU-s: images per CPU second of this process,\n"
          "in-process rows only (robust to other load on a shared machine). x base: img/s/core over the baseline's\n"
          "at the same px; x base CPU: the same with img/CPU-s.")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    settings = {"n_images": N_IMAGES, "size_px": [WIDTH_PX, HEIGHT_PX], "source_quality": SOURCE_QUALITY,
                "fundus_radius_of_height": FUNDUS_RADIUS, "resample": FILTERS[0], "reducing_gap": P.REDUCING_GAP,
                "jpeg_quality": P.JPEG_QUALITY, "workers_all": workers_all}
    RESULTS.write_text(json.dumps({"hardware": hw, "settings": settings, "rows": rows}, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()

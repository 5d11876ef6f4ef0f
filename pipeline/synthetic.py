"""Synthetic ODIR-5K data sets in the original layout: `data.xlsx` + `Training Images/{ID}_{left,right}.jpg`.

The built-in data of `train.py`'s CPU demo and of the tests: every sign is drawn to stay plainly visible after the
fundus crop and a resize to ~128 px (realism is secondary; the signs per class: docs/DESIGN-NOTES.md). Diseases are
drawn per eye, and the patient's labels follow as in ODIR: a class is 1 if either eye has it, N iff both are normal.
Each patient has its own RNG (`[seed, patient_index]`), so the bytes do not depend on the number of workers.
Where each localised sign is drawn goes to `regions.csv` (`read_regions`): the ground truth of the heatmap test.
The module reads top to bottom: labels → anatomy → vessels → lesions → one patient → the set.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import pathlib
import re
import shutil
import socket
import zipfile
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from odir_dual.pipeline.constants import CLASSES
from odir_dual.pipeline.host import atomic_write, progress_enabled, usable_cores

COLUMNS = ("ID", "Patient Age", "Patient Sex", "Left-Fundus", "Right-Fundus",
           "Left-Diagnostic Keywords", "Right-Diagnostic Keywords", *CLASSES)
IMAGE_DIR = "Training Images"
SHEET_NAME = "data.xlsx"
REGIONS_NAME = "regions.csv"  # where the localised signs are drawn: id, eye, class, sign, x_px, y_px, r_px
REGION_COLUMNS = ("id", "eye", "class", "sign", "x_px", "y_px", "r_px")
MARKER_NAME = "COMPLETE.json"  # written last by ensure_synthetic_odir: its presence means the set is whole


def is_synthetic(data) -> bool:
    """Whether a data folder is the generated demo set (its marker, or a `synthetic` folder on its path): reports,
    the model card and serve.py warn that its figures mean nothing medically."""
    folder = pathlib.Path(str(data))
    return bool(str(data)) and ("synthetic" in folder.parts or (folder / MARKER_NAME).is_file())
KEYWORD_SEP = "，"  # full-width comma, as in the real sheet
NORMAL_KEYWORD = "normal fundus"
# Keywords per disease class (real ODIR vocabulary); the first one is drawn most often.
KEYWORDS = {
    "D": ("moderate non proliferative retinopathy", "mild nonproliferative retinopathy",
          "severe nonproliferative retinopathy", "proliferative diabetic retinopathy"),
    "G": ("glaucoma", "suspected glaucoma"),
    "C": ("cataract",),
    "A": ("dry age-related macular degeneration", "wet age-related macular degeneration"),
    "H": ("hypertensive retinopathy",),
    "M": ("pathological myopia",),
    "O": ("laser spot", "chorioretinal atrophy", "retinal pigmentation"),
}
GENERATOR_VERSION = 2  # bump when the drawing changes, so cached sets are regenerated

WORK_PX = 512  # largest fundus diameter actually drawn; bigger images are upscaled from it
JPEG_QUALITY = 90

# Patient-level prevalence targets (fraction of patients), roughly ODIR's ranking but with every class
# frequent enough to learn from a few hundred patients.
_PREVALENCE = {"D": 0.25, "G": 0.10, "C": 0.10, "A": 0.10, "H": 0.10, "M": 0.10, "O": 0.15}
_P_NORMAL = 0.30
# P(both eyes | patient has the class); systemic diseases (D, H) and myopia are usually bilateral.
_P_BILATERAL = {"D": 0.85, "G": 0.6, "C": 0.6, "A": 0.6, "H": 0.85, "M": 0.85, "O": 0.3}
# Keyword probabilities per class, same order as KEYWORDS.
_P_KEYWORD = {"D": (0.5, 0.25, 0.15, 0.1), "G": (0.8, 0.2), "C": (1.0,), "A": (0.75, 0.25),
              "H": (1.0,), "M": (1.0,), "O": (0.34, 0.33, 0.33)}
_ASPECTS = (1.0, 4 / 3, 3 / 2)  # width / height of the cameras' frames


# ----------------------------------------------------------------------------------------------- labels
@functools.lru_cache(maxsize=None)
def _abnormal_class_probs() -> dict[str, float]:
    """Independent per-class probabilities for an abnormal patient (empty draws are redrawn) that give
    the marginal prevalences of `_PREVALENCE` over all patients.

    With q_k = c * prev_k, rejection of the empty set divides by Z(c) = 1 - prod(1 - q_k); we need
    (1 - p_normal) * c / Z(c) = 1, solved by bisection.
    """
    prev = np.array(list(_PREVALENCE.values()))
    lo, hi = 1e-6, 1.0 / prev.max()
    for _ in range(60):
        c = (lo + hi) / 2
        z = 1.0 - np.prod(1.0 - c * prev)
        lo, hi = (c, hi) if (1 - _P_NORMAL) * c < z else (lo, c)
    return {k: float(lo * p) for k, p in _PREVALENCE.items()}


def _draw_eye_diseases(rng: np.random.Generator) -> tuple[dict, dict]:
    """Return (left, right): dicts class -> keyword for each eye; both empty for a normal patient."""
    left, right = {}, {}
    if rng.random() < _P_NORMAL:
        return left, right
    probs = _abnormal_class_probs()
    classes = []
    while not classes:
        classes = [k for k, p in probs.items() if rng.random() < p]
    for k in classes:
        if rng.random() < _P_BILATERAL[k]:
            eyes = (left, right)
        else:
            eyes = (left,) if rng.random() < 0.5 else (right,)
        for eye in eyes:
            eye[k] = KEYWORDS[k][rng.choice(len(KEYWORDS[k]), p=_P_KEYWORD[k])]
    return left, right


def _draw_age(rng: np.random.Generator, classes: set) -> int:
    """Age in years; A and C patients are older, as in ODIR."""
    if classes & {"A", "C"}:
        mean, sd = 70, 8
    elif classes & {"D", "H", "G"}:
        mean, sd = 60, 10
    else:
        mean, sd = 52, 14
    return int(np.clip(round(rng.normal(mean, sd)), 18, 92))


def _sheet_row(patient_id: int, age: int, sex: str, left: dict, right: dict) -> dict:
    """One data.xlsx row; labels are the union over both eyes, N iff neither eye has a disease."""
    row = {"ID": patient_id, "Patient Age": age, "Patient Sex": sex,
           "Left-Fundus": f"{patient_id}_left.jpg", "Right-Fundus": f"{patient_id}_right.jpg",
           "Left-Diagnostic Keywords": KEYWORD_SEP.join(left.values()) or NORMAL_KEYWORD,
           "Right-Diagnostic Keywords": KEYWORD_SEP.join(right.values()) or NORMAL_KEYWORD}
    for k in CLASSES:
        row[k] = int(not left and not right) if k == "N" else int(k in left or k in right)
    return row


# ------------------------------------------------------------------------------------ drawing helpers
def _smooth_noise(rng: np.random.Generator, size_px: int, cells: int) -> np.ndarray:
    """Smooth random field, roughly unit variance, with about `cells` blobs across `size_px`."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse).resize((size_px, size_px), Image.BICUBIC))


def _grid(x0: int, y0: int, x1: int, y1: int, cx: float, cy: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre offsets (dx, dy) from (cx, cy) over the box [x0, x1) x [y0, y1), broadcastable."""
    dx = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5 - cx
    dy = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5 - cy
    return dx, dy


def _box(cx: float, cy: float, half_px: float, d_px: int) -> tuple[int, int, int, int]:
    """Integer box of half-size `half_px` around (cx, cy), clipped to the tile."""
    return (max(0, int(cx - half_px)), max(0, int(cy - half_px)),
            min(d_px, int(cx + half_px) + 2), min(d_px, int(cy + half_px) + 2))


def _tint(img: np.ndarray, alpha: np.ndarray, color, box=None) -> None:
    """Blend towards `color` (RGB 0..1) with per-pixel `alpha`, in place, optionally inside `box`."""
    sub = img if box is None else img[box[1]:box[3], box[0]:box[2]]
    a = alpha[..., None]
    sub += a * (np.asarray(color, np.float32) - sub)


def _shade(img: np.ndarray, alpha: np.ndarray, factor, box=None) -> None:
    """Multiply by the RGB `factor` where alpha = 1 (darkening that keeps the local illumination)."""
    sub = img if box is None else img[box[1]:box[3], box[0]:box[2]]
    gain = alpha[..., None] * (np.asarray(factor, np.float32) - 1.0)
    gain += 1.0
    sub *= gain


def _mask_alpha(mask: Image.Image, blur_px: float) -> tuple[np.ndarray, tuple] | tuple[None, None]:
    """Blurred 'L' mask -> (alpha 0..1 over its bounding box, box), or (None, None) when empty."""
    box = mask.getbbox()
    if box is None:
        return None, None
    if blur_px > 0:  # blur only the (padded) bounding box: most masks cover a small part of the tile
        pad = int(3 * blur_px) + 1
        box = (max(0, box[0] - pad), max(0, box[1] - pad),
               min(mask.width, box[2] + pad), min(mask.height, box[3] + pad))
        return np.asarray(mask.crop(box).filter(ImageFilter.GaussianBlur(blur_px)), np.float32) / 255.0, box
    return np.asarray(mask.crop(box), np.float32) / 255.0, box


def _apply_mask(img, mask, blur_px, color=None, factor=None) -> None:
    """Tint towards `color` or shade by `factor` through an 'L' mask (only its bounding box is touched)."""
    alpha, box = _mask_alpha(mask, blur_px)
    if alpha is None:
        return
    if color is not None:
        _tint(img, alpha, color, box)
    else:
        _shade(img, alpha, factor, box)


def _dots(d_px: int, xs, ys, rs, opacity=None) -> Image.Image:
    """'L' mask with filled circles of radius `rs` (px) at (xs, ys); opacity 0..1 per dot."""
    mask = Image.new("L", (d_px, d_px))
    draw = ImageDraw.Draw(mask)
    opacity = np.ones(len(xs)) if opacity is None else opacity
    for x, y, r, o in zip(xs, ys, rs, opacity):
        r = max(r, 0.6)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=int(255 * o))
    return mask


def _scatter(rng, n: int, cx: float, cy: float, sd_px: float, max_px: float) -> tuple:
    """n Gaussian points around (cx, cy), pulled in to at most `max_px` away."""
    pts = rng.normal(0.0, sd_px, size=(n, 2))
    norm = np.maximum(np.hypot(pts[:, 0], pts[:, 1]) / max_px, 1.0)
    pts /= norm[:, None]
    return cx + pts[:, 0], cy + pts[:, 1]


def _annulus(rng, n: int, cx: float, cy: float, r_in_px: float, r_out_px: float) -> tuple:
    """n points uniform in area over the ring r_in..r_out around (cx, cy)."""
    rho = np.sqrt(rng.uniform(r_in_px ** 2, r_out_px ** 2, n))
    phi = rng.uniform(0, 2 * np.pi, n)
    return cx + rho * np.cos(phi), cy + rho * np.sin(phi)


# ------------------------------------------------------------------------------------------- anatomy
class _Eye:
    """Geometry of one eye in the working tile: fundus radius, disc and macula centres (px)."""

    def __init__(self, rng: np.random.Generator, d_px: int, is_right: bool):
        self.d_px = d_px
        self.r_px = d_px / 2.0
        self.c_px = d_px / 2.0
        # Temporal direction in x: the macula lies temporal to the disc, so eyes are mirror images
        # (right eye: disc on the right of the image).
        self.t = -1.0 if is_right else 1.0
        r = self.r_px
        self.disc_r_px = 0.15 * r * rng.uniform(0.92, 1.08)  # disc diameter ~15% of the fundus diameter
        self.mac_x = self.c_px + self.t * r * rng.uniform(0.25, 0.33)
        self.mac_y = self.c_px + r * rng.uniform(0.0, 0.08)
        # Fovea ~2.5 disc diameters temporal to the disc and slightly below it.
        self.disc_x = self.mac_x - self.t * 2.5 * 2 * self.disc_r_px
        self.disc_y = self.mac_y - r * rng.uniform(0.05, 0.1)


class _Look:
    """Per-patient colour and illumination (shared by both eyes, with a little per-eye jitter)."""

    def __init__(self, rng: np.random.Generator):
        self.bright = rng.uniform(0.72, 1.05)
        self.base = np.array([0.86, 0.36 * rng.uniform(0.8, 1.2), 0.14 * rng.uniform(0.7, 1.4)], np.float32)
        self.falloff = rng.uniform(0.35, 0.6)  # brightness loss at the rim, fraction

    def jitter(self, rng: np.random.Generator) -> "_Look":
        """The same patient's other eye: nearly the same colour, slightly different exposure."""
        eye = object.__new__(_Look)
        eye.bright = self.bright * rng.uniform(0.94, 1.06)
        eye.base = self.base * rng.uniform(0.97, 1.03, 3).astype(np.float32)
        eye.falloff = self.falloff
        return eye


def _background(rng, eye: _Eye, look: _Look) -> np.ndarray:
    """Orange-red fundus with radial falloff, uneven illumination and faint choroidal texture."""
    low_px = max(16, eye.d_px // 4)  # the light field is smooth: compute it small, upscale once
    dx, dy = _grid(0, 0, low_px, low_px, low_px / 2, low_px / 2)
    rho2 = (dx * dx + dy * dy) / (low_px / 2) ** 2
    light = (1.0 - look.falloff * rho2) * (1.0 + 0.08 * _smooth_noise(rng, low_px, 4))
    light *= 1.0 + 0.035 * _smooth_noise(rng, low_px, 28)
    light = np.asarray(Image.fromarray(light).resize((eye.d_px, eye.d_px), Image.BILINEAR))
    return (look.base * look.bright) * light[..., None]


def _add_macula(rng, img, eye: _Eye) -> None:
    """Darker macula (sigma ~0.14 R) with a darker fovea and a small bright foveal reflex."""
    sd = eye.r_px * rng.uniform(0.12, 0.16)
    box = _box(eye.mac_x, eye.mac_y, 3 * sd, eye.d_px)
    dx, dy = _grid(*box, eye.mac_x, eye.mac_y)
    r2 = dx * dx + dy * dy
    _shade(img, 0.65 * np.exp(-r2 / (2 * sd * sd)), (0.58, 0.5, 0.6), box)
    _shade(img, 0.45 * np.exp(-r2 / (2 * (0.3 * sd) ** 2)), (0.6, 0.5, 0.6), box)
    _tint(img, 0.45 * np.exp(-r2 / (2 * (0.05 * sd) ** 2 + 1.0)), (0.95, 0.8, 0.65), box)


def _ellipse_alpha(dx, dy, rx, ry, edge: float) -> np.ndarray:
    """Soft-edged filled ellipse: 1 inside, 0 outside, a ramp of relative width `edge`."""
    dn = np.sqrt((dx / rx) ** 2 + (dy / ry) ** 2)
    return np.clip((1.0 - dn) / edge + 0.5, 0.0, 1.0)


def _add_disc(img, eye: _Eye, look: _Look, cup_ratio: float, pale: float) -> None:
    """Yellow optic disc (slightly taller than wide) with a whitish cup of diameter ratio `cup_ratio`."""
    r = eye.disc_r_px
    box = _box(eye.disc_x, eye.disc_y, 1.4 * r, eye.d_px)
    dx, dy = _grid(*box, eye.disc_x, eye.disc_y)
    b = min(1.0, look.bright * 1.15)
    rim = np.array([0.97, 0.70 + 0.15 * pale, 0.42 + 0.25 * pale], np.float32) * b
    _tint(img, _ellipse_alpha(dx, dy, 0.92 * r, r, 0.15), rim, box)
    # The cup sits a little temporal in the disc.
    cdx = dx - eye.t * 0.12 * r * (1 - cup_ratio)
    cup = np.array([1.0, 0.95, 0.82], np.float32) * b
    _tint(img, 0.95 * _ellipse_alpha(cdx, dy, 0.92 * r * cup_ratio, r * cup_ratio, 0.25), cup, box)


def _add_nerve_fibre_defects(rng, img, eye: _Eye) -> None:
    """Glaucomatous nerve-fibre-layer loss: 1-2 dark wedges fanning out of the disc towards the superior
    and/or inferior temporal arcade."""
    d, t = eye.d_px, eye.t
    dx, dy = _grid(0, 0, d, d, eye.disc_x, eye.disc_y)
    phi = np.arctan2(dy, dx)
    rho = np.sqrt(dx * dx + dy * dy)
    sides = (-1.0, 1.0) if rng.random() < 0.5 else (rng.choice((-1.0, 1.0)),)
    for side in sides:  # -1: superior (y up), +1: inferior
        centre = side * (np.pi / 2 - t * 0.55) + rng.normal(0, 0.1)  # heading like the temporal arcades
        half = rng.uniform(0.18, 0.28)  # half-width of the wedge, rad
        off = np.abs((phi - centre + np.pi) % (2 * np.pi) - np.pi)  # angle to the wedge's axis, rad
        along = np.clip((rho - eye.disc_r_px) / (0.1 * eye.r_px), 0, 1) * np.clip(1.6 - rho / (0.5 * eye.r_px), 0, 1)
        _shade(img, np.clip((half - off) / 0.05, 0, 1) * along, (0.58, 0.48, 0.58))


def _add_ppa(rng, img, eye: _Eye, look: _Look) -> None:
    """Peripapillary atrophy: a pale crescent beside the disc on the temporal side (drawn before the disc)."""
    r = eye.disc_r_px
    width = rng.uniform(0.5, 0.9)  # crescent width in disc radii
    # An ellipse sharing the disc's nasal edge and height, stretched temporally: only a crescent shows.
    cx = eye.disc_x + eye.t * width * r * 0.5
    box = _box(cx, eye.disc_y, (1.5 + width) * r, eye.d_px)
    dx, dy = _grid(*box, cx, eye.disc_y)
    alpha = _ellipse_alpha(dx, dy, (0.92 + width * 0.5) * r, 1.02 * r, 0.15)
    _shade(img, 0.5 * _ellipse_alpha(dx, dy, (1.0 + width * 0.5) * r, 1.08 * r, 0.1), (0.6, 0.5, 0.5), box)
    _tint(img, 0.9 * alpha, np.array([0.96, 0.86, 0.72], np.float32) * min(1.0, look.bright * 1.1), box)


def _add_tessellation(rng, img, eye: _Eye) -> None:
    """Tigroid fundus: wavy bands (contour lines of a smooth random field) with dark interspaces, the
    choroidal vessels showing through a thin, stretched retina."""
    d = eye.d_px
    wave = np.cos(rng.uniform(10, 13) * _smooth_noise(rng, d, 4) + 1.5 * _smooth_noise(rng, d, 9))
    _shade(img, rng.uniform(0.6, 0.8) * np.clip(wave * 2.0, 0.0, 1.0), (0.55, 0.42, 0.5))


# ------------------------------------------------------------------------------------------- vessels
def _walk(rng, x0, y0, heading, curv_per_r, length_px, w0_px, r_px, wiggle) -> tuple[np.ndarray, ...]:
    """A smoothly curving path: points (n, 2), headings (n,) in rad, widths (n,) in px tapering to 40%."""
    step_px = max(1.5, 0.02 * r_px)
    n = max(4, int(length_px / step_px))
    noise = np.convolve(rng.standard_normal(n + 6), np.full(7, 1 / 7), mode="valid")[:n]
    theta = np.empty(n + 1)
    theta[0] = heading
    np.cumsum(curv_per_r * step_px / r_px + wiggle * noise, out=theta[1:])
    theta[1:] += heading
    pts = np.empty((n + 1, 2))
    pts[0] = x0, y0
    np.cumsum(step_px * np.cos(theta[1:]), out=pts[1:, 0])
    np.cumsum(step_px * np.sin(theta[1:]), out=pts[1:, 1])
    pts[1:] += pts[0]
    widths = w0_px * (1.0 - 0.6 * np.arange(n + 1) / n)
    return pts, theta, widths


def _grow(rng, x0, y0, heading, curv_per_r, length_px, w0_px, r_px, wiggle, depth, out) -> None:
    """Append a vessel and, recursively, its side branches (2-4 off a trunk, 1-2 off a branch) to `out`."""
    pts, theta, widths = _walk(rng, x0, y0, heading, curv_per_r, length_px, w0_px, r_px, wiggle)
    out.append((pts, widths))
    if depth == 0:
        return
    n = len(pts)
    for _ in range(int(rng.integers(2, 5) if depth > 1 else rng.integers(1, 3))):
        i = int(rng.integers(n // 6, max(n // 6 + 1, 4 * n // 5)))
        side = rng.choice((-1.0, 1.0))
        _grow(rng, pts[i, 0], pts[i, 1], theta[i] + side * rng.uniform(0.45, 1.0),
              side * rng.uniform(0.0, 1.2), (n - i) * length_px / n * rng.uniform(0.5, 0.9) + 0.1 * r_px,
              widths[i] * rng.uniform(0.55, 0.75), r_px, wiggle, depth - 1, out)


def _vessel_trees(rng, eye: _Eye, artery_w_scale: float, artery_wiggle: float) -> tuple[list, list]:
    """(veins, arteries) as lists of (points, widths), leaving the disc in four arcades + macular twigs."""
    t, r = eye.t, eye.r_px
    to_mac = math.atan2(eye.mac_y - eye.disc_y, eye.mac_x - eye.disc_x)
    trunks = (  # heading (rad, image coords: y down), curvature (rad per R), length (R), width scale
        (-np.pi / 2 + t * 0.4, t * 1.1, 1.25, 1.0),  # superior temporal arcade, curving round the macula
        (np.pi / 2 - t * 0.4, -t * 1.1, 1.25, 1.0),  # inferior temporal arcade
        (-np.pi / 2 - t * 0.55, -t * 0.5, 1.0, 0.8),  # superior nasal
        (np.pi / 2 + t * 0.55, t * 0.5, 1.0, 0.8),  # inferior nasal
        (to_mac - 0.35, 0.0, 0.35, 0.45),  # small macular branches
        (to_mac + 0.35, 0.0, 0.35, 0.45),
    )
    veins, arteries = [], []
    for heading, curv, length, wscale in trunks:
        for out, w0, dh, wiggle in ((veins, 0.03, 0.0, 0.05), (arteries, 0.02 * artery_w_scale,
                                                                 rng.uniform(0.1, 0.22) * rng.choice((-1, 1)),
                                                                 artery_wiggle)):
            x0 = eye.disc_x + rng.normal(0, 0.15) * eye.disc_r_px
            y0 = eye.disc_y + rng.normal(0, 0.15) * eye.disc_r_px
            _grow(rng, x0, y0, heading + dh, curv * rng.uniform(0.8, 1.2), length * r * rng.uniform(0.9, 1.1),
                  w0 * wscale * r, r, wiggle, 2 if wscale > 0.5 else 0, out)
    return veins, arteries


def _draw_paths(layer: Image.Image, paths: list, factor, width_scale: float = 1.0) -> None:
    """Rasterise tapered paths into a multiplicative RGB layer (128 = x1) as the RGB gain `factor`;
    sub-pixel widths become partial strength."""
    draw = ImageDraw.Draw(layer)
    gain = np.asarray(factor, np.float32) * 128 - 128
    for pts, widths in paths:
        chunk_w = (widths[3::6] if len(widths) > 3 else widths[:1]) * width_scale  # one width per 6 segments
        fills = (128.5 + np.minimum(chunk_w, 1.0)[:, None] * gain).astype(int).tolist()
        for s, w, fill in zip(range(0, len(pts) - 1, 6), chunk_w.tolist(), fills):
            draw.line(pts[s:s + 7].ravel().tolist(), fill=tuple(fill), width=max(1, round(w)), joint="curve")


def _add_vessels(rng, img, eye: _Eye, hypertensive: bool) -> None:
    """Dark-red veins, thinner and lighter arteries on top; hypertensive arteries are thin, pale, tortuous
    and copper-wired (a bright orange reflex along their centre)."""
    a_scale, a_wiggle = (0.6, 0.14) if hypertensive else (1.0, 0.05)
    veins, arteries = _vessel_trees(rng, eye, a_scale, a_wiggle)
    # One multiplicative layer for the whole tree: a single full-tile pass instead of one per kind.
    # No blur: `_finish` blurs the whole drawing once, which anti-aliases these lines.
    layer = Image.new("RGB", (eye.d_px, eye.d_px), (128, 128, 128))
    _draw_paths(layer, veins, (0.42, 0.24, 0.34))
    if hypertensive:
        _draw_paths(layer, arteries, (0.82, 0.64, 0.6))
        _draw_paths(layer, arteries, (1.25, 1.8, 1.99), 0.6)
    else:
        _draw_paths(layer, arteries, (0.7, 0.46, 0.5))
    gain = np.asarray(layer, np.float32)
    gain *= 1 / 128
    img *= gain


# ------------------------------------------------------------------------------------------ lesions
def _add_diabetic(rng, img, eye: _Eye, look: _Look, keyword: str) -> list[tuple]:
    """Microaneurysms and blot haemorrhages (dark red dots) + clusters of yellow hard exudates.
    Returns the regions (sign, x, y, r) in tile px: each blot, and a circle round each exudate cluster."""
    r, d = eye.r_px, eye.d_px
    severity = {"mild": 0.7, "moderate": 1.0, "severe": 1.3, "proliferative": 1.4}[keyword.split()[0]]
    cx, cy = (eye.disc_x + 2 * eye.mac_x) / 3, eye.mac_y
    n_ma, n_blot = int(severity * rng.integers(25, 50)), int(severity * rng.integers(10, 22))
    xs, ys = _scatter(rng, n_ma + n_blot, cx, cy, 0.4 * r, 0.8 * r)
    rs = np.r_[rng.uniform(0.008, 0.014, n_ma), rng.uniform(0.02, 0.045, n_blot)] * r
    _apply_mask(img, _dots(d, xs, ys, rs), 0, factor=(0.5, 0.2, 0.25))
    regions = [("blot", x, y, q) for x, y, q in zip(xs[n_ma:], ys[n_ma:], rs[n_ma:])]  # microaneurysms: too small
    xs, ys, rs = [], [], []
    for _ in range(int(rng.integers(2, 5) * severity + 0.5)):  # exudates come in clusters / rings
        ccx, ccy = _scatter(rng, 1, eye.mac_x, eye.mac_y, 0.25 * r, 0.45 * r)
        n = int(rng.integers(8, 20))
        x, y = _scatter(rng, n, ccx[0], ccy[0], 0.06 * r, 0.15 * r)
        xs.append(x), ys.append(y), rs.append(rng.uniform(0.012, 0.03, n) * r)
        regions.append(("exudates", *_enclosing(ccx[0], ccy[0], x, y, rs[-1])))
    # Deep yellow and sharp-edged, unlike the paler, soft drusen of AMD.
    color = np.array([1.0, 0.85, 0.28], np.float32) * min(1.0, look.bright * 1.2)
    _apply_mask(img, _dots(d, np.concatenate(xs), np.concatenate(ys), np.concatenate(rs)), 0, color=color)
    return regions


def _enclosing(cx: float, cy: float, xs, ys, rs) -> tuple[float, float, float]:
    """(cx, cy, r): the circle about (cx, cy) that holds every dot (xs, ys, radius rs)."""
    return cx, cy, float(np.max(np.hypot(np.asarray(xs) - cx, np.asarray(ys) - cy) + rs))


def _add_drusen(rng, img, eye: _Eye, look: _Look, wet: bool) -> list[tuple]:
    """A dense cloud of small, soft, pale-yellow drusen centred on the macula; wet AMD adds a dark
    haemorrhagic patch at the fovea. Returns the region: the circle round the cloud, in tile px."""
    r, d = eye.r_px, eye.d_px
    n = int(rng.integers(90, 180))
    xs, ys = _scatter(rng, n, eye.mac_x, eye.mac_y, rng.uniform(0.1, 0.16) * r, 0.38 * r)
    color = np.array([0.98, 0.9, 0.64], np.float32) * min(1.0, look.bright * 1.2)
    rs = rng.uniform(0.012, 0.03, n) * r
    mask = _dots(d, xs, ys, rs, rng.uniform(0.6, 1.0, n))
    _apply_mask(img, mask, 0.004 * r, color=color)
    regions = [("drusen", *_enclosing(eye.mac_x, eye.mac_y, xs, ys, rs))]
    if wet:
        xs, ys = _scatter(rng, 6, eye.mac_x, eye.mac_y, 0.04 * r, 0.06 * r)
        mask = _dots(d, xs, ys, rng.uniform(0.04, 0.07, 6) * r)
        _apply_mask(img, mask, 1.5, factor=(0.45, 0.3, 0.35))
    return regions


def _flame_polygon(x, y, angle, length_px, width_px) -> list:
    """A flame (elongated, tapered) haemorrhage pointing along `angle`, as polygon vertices."""
    s = np.linspace(0, np.pi, 9)
    along = np.r_[-np.cos(s), np.cos(s)] * length_px / 2
    across = np.r_[np.sin(s), -np.sin(s)] * width_px / 2 * np.r_[1 - 0.5 * s / np.pi, 1 - 0.5 * s[::-1] / np.pi]
    ca, sa = math.cos(angle), math.sin(angle)
    return np.stack([x + along * ca - across * sa, y + along * sa + across * ca], axis=1).ravel().tolist()


def _add_hypertensive(rng, img, eye: _Eye, look: _Look) -> None:
    """Flame haemorrhages radiating around the disc + fluffy cotton-wool spots (the arteries are done in
    `_add_vessels`)."""
    r, d = eye.r_px, eye.d_px
    mask = Image.new("L", (d, d))
    draw = ImageDraw.Draw(mask)
    n = int(rng.integers(12, 20))
    # Flames lie along the nerve fibres, i.e. radially round the disc (a red starburst), most above and
    # below it; bright red, unlike the dark round blots of diabetes.
    phi = rng.choice((-np.pi / 2, np.pi / 2), n) + rng.normal(0, 0.9, n)
    rho = eye.disc_r_px * rng.uniform(1.6, 3.5, n)
    for p, q in zip(phi, rho):
        draw.polygon(_flame_polygon(eye.disc_x + q * math.cos(p), eye.disc_y + q * math.sin(p), p,
                                    rng.uniform(0.12, 0.22) * r, rng.uniform(0.035, 0.055) * r), fill=235)
    _apply_mask(img, mask, 0.8, factor=(0.68, 0.12, 0.12))
    n = int(rng.integers(4, 8))
    xs, ys = _annulus(rng, n, eye.disc_x, eye.disc_y, 2.0 * eye.disc_r_px, 0.5 * r)
    color = np.array([0.98, 0.93, 0.86], np.float32) * min(1.0, look.bright * 1.15)
    _apply_mask(img, _dots(d, xs, ys, rng.uniform(0.03, 0.05, n) * r, rng.uniform(0.7, 0.9, n)),
                0.012 * r, color=color)


def _add_other(rng, img, eye: _Eye, look: _Look, keyword: str) -> list[tuple]:
    """The 'other' lesion named by `keyword`: laser spots, a pale scar, or a dark pigmented patch.
    Returns the regions (sign, x, y, r) in tile px: each laser spot, or the circle round the scar / patch."""
    r, d = eye.r_px, eye.d_px
    pale = np.array([0.97, 0.9, 0.76], np.float32) * min(1.0, look.bright * 1.15)
    if keyword == "laser spot":  # old pan-retinal photocoagulation: heavily pigmented rings, pale centres
        n = int(rng.integers(50, 110))
        xs, ys = _annulus(rng, n, eye.c_px, eye.c_px, 0.5 * r, 0.92 * r)
        rs = rng.uniform(0.022, 0.035, n) * r
        _apply_mask(img, _dots(d, xs, ys, rs * 1.5), 0, factor=(0.25, 0.2, 0.2))
        _apply_mask(img, _dots(d, xs, ys, rs * 0.7), 0, color=pale)
        return [("laser spot", x, y, q) for x, y, q in zip(xs, ys, rs * 1.5)]
    size = rng.uniform(0.12, 0.2) * r
    x0, y0 = _free_spot(rng, eye, size)
    n = int(rng.integers(6, 11))
    xs, ys = _scatter(rng, n, x0, y0, 0.5 * size, size)  # an irregular blob: a union of circles
    rs = rng.uniform(0.5, 0.9, n) * size
    if keyword == "chorioretinal atrophy":  # bare sclera with a pigmented rim and pigment clumps
        _apply_mask(img, _dots(d, xs, ys, rs * 1.12), 1.5, factor=(0.4, 0.32, 0.35))
        _apply_mask(img, _dots(d, xs, ys, rs, rng.uniform(0.8, 0.95, n)), 2.5, color=pale)
        px, py = _scatter(rng, 8, x0, y0, 0.6 * size, 1.2 * size)
        _apply_mask(img, _dots(d, px, py, rng.uniform(0.01, 0.02, 8) * r), 0, factor=(0.3, 0.25, 0.28))
        return [("scar", *_enclosing(x0, y0, xs, ys, rs * 1.12))]
    # retinal pigmentation: a slate-grey patch with scattered clumps (the region is the patch, not the clumps)
    _apply_mask(img, _dots(d, xs, ys, rs * 0.8), 2.0, factor=(0.32, 0.3, 0.45))
    px, py = _scatter(rng, 25, x0, y0, 1.5 * size, 3 * size)
    _apply_mask(img, _dots(d, px, py, rng.uniform(0.01, 0.02, 25) * r), 0, factor=(0.3, 0.28, 0.35))
    return [("pigmented patch", *_enclosing(x0, y0, xs, ys, rs * 0.8))]


def _free_spot(rng, eye: _Eye, size_px: float) -> tuple[float, float]:
    """A mid-peripheral point whose lesion of radius `size_px` clears the disc and the fovea."""
    for _ in range(50):
        ang = rng.uniform(0, 2 * np.pi)
        x = eye.c_px + eye.r_px * rng.uniform(0.35, 0.65) * math.cos(ang)
        y = eye.c_px + eye.r_px * rng.uniform(0.35, 0.65) * math.sin(ang)
        if (math.hypot(x - eye.disc_x, y - eye.disc_y) > 2 * eye.disc_r_px + 1.5 * size_px
                and math.hypot(x - eye.mac_x, y - eye.mac_y) > 1.5 * size_px):
            break
    return x, y


def _add_cataract(rng, img: np.ndarray, eye: _Eye) -> np.ndarray:
    """Lens opacity: strong blur, a whitish veil and lower contrast over the whole view."""
    u8 = Image.fromarray(np.clip(img * 255, 0, 255).astype(np.uint8))
    blurred = u8.filter(ImageFilter.GaussianBlur(rng.uniform(0.015, 0.025) * eye.d_px))
    out = np.asarray(blurred, np.float32) / 255.0
    mean = out.reshape(-1, 3).mean(0)
    veil = np.array([0.85, 0.72, 0.62], np.float32) * max(0.6, float(mean.max()) * 1.3)
    out = mean + (out - mean) * 0.75  # lower contrast
    return out + rng.uniform(0.25, 0.45) * (veil - out)


@functools.lru_cache(maxsize=4)
def _aperture(d_px: int) -> np.ndarray:
    """(d, d, 1) weight of the round aperture: 1 inside, 0 outside, a 1.5 px soft edge."""
    dx, dy = _grid(0, 0, d_px, d_px, d_px / 2, d_px / 2)
    inside = np.clip((d_px / 2 - 1.0 - np.sqrt(dx * dx + dy * dy)) / 1.5, 0.0, 1.0)
    return inside[..., None]


def _finish(rng, img: np.ndarray, eye: _Eye, blur_px: float) -> Image.Image:
    """Round aperture on black, sensor grain, uint8, then a slight defocus blur (`blur_px`; a box blur
    is 3x cheaper than a Gaussian and at radius < 1 px looks the same). Consumes `img`."""
    aperture = _aperture(eye.d_px)
    grain = rng.random((eye.d_px, eye.d_px, 1), dtype=np.float32)  # uniform grain: 2x cheaper than normal
    grain -= 0.5
    grain *= 255 * 0.04 * aperture  # +-5 levels inside the fundus, none on the black border
    grain += 0.5  # rounds on the cast below
    img *= 255 * aperture
    img += grain
    out = Image.fromarray(np.clip(img, 0, 255, out=img).astype(np.uint8))
    return out.filter(ImageFilter.BoxBlur(blur_px)) if blur_px > 0 else out


def _render_eye(rng, d_px: int, is_right: bool, look: _Look, diseases: dict,
                regions: list | None = None) -> Image.Image:
    """Draw one fundus (d_px x d_px RGB on black) showing the signs of every class in `diseases`; the
    localised signs are appended to `regions` as (class, sign, x, y, r) in tile px."""
    regions = [] if regions is None else regions
    eye = _Eye(rng, d_px, is_right)
    img = _background(rng, eye, look)
    if "M" in diseases:
        _add_tessellation(rng, img, eye)
    _add_macula(rng, img, eye)
    if "M" in diseases:
        _add_ppa(rng, img, eye, look)
    glaucoma = "G" in diseases
    cup_ratio = rng.uniform(0.72, 0.9) if glaucoma else rng.uniform(0.25, 0.4)
    if glaucoma:
        _add_nerve_fibre_defects(rng, img, eye)
        regions.append(("G", "cupped disc", eye.disc_x, eye.disc_y, eye.disc_r_px))
    _add_disc(img, eye, look, cup_ratio, pale=0.9 if glaucoma else 0.0)
    _add_vessels(rng, img, eye, hypertensive="H" in diseases)
    if "H" in diseases:
        _add_hypertensive(rng, img, eye, look)
    if "D" in diseases:
        regions += [("D", *sign) for sign in _add_diabetic(rng, img, eye, look, diseases["D"])]
    if "A" in diseases:
        regions += [("A", *sign) for sign in _add_drusen(rng, img, eye, look, wet=diseases["A"].startswith("wet"))]
    if "O" in diseases:
        regions += [("O", *sign) for sign in _add_other(rng, img, eye, look, diseases["O"])]
    if "C" in diseases:
        return _finish(rng, _add_cataract(rng, img, eye), eye, 0.0)
    # Real photographs are never perfectly sharp; this also anti-aliases the drawing (needed before an
    # upscale too, which would otherwise magnify the jaggies).
    return _finish(rng, img, eye, rng.uniform(0.4, 0.8) * d_px / 512)


# ------------------------------------------------------------------------------------- one patient
def _draw_camera(rng, min_px: int, max_px: int) -> tuple[int, int, int, int, int]:
    """Frame (w_px, h_px), fundus diameter and top-left corner of the fundus tile in the frame.

    Wide frames clip the circle at top and bottom, like most fundus cameras; square ones show all of it.
    """
    w_px = int(rng.integers(min_px, max_px + 1))
    aspect = _ASPECTS[int(rng.integers(len(_ASPECTS)))]
    h_px = max(1, round(w_px / aspect))
    lo, hi = (0.86, 0.97) if aspect == 1.0 else (0.98, 1.12)
    diam_px = max(8, min(round(h_px * rng.uniform(lo, hi)), round(0.96 * w_px)))
    x0 = round((w_px - diam_px) / 2 + rng.uniform(-0.02, 0.02) * w_px)
    y0 = round((h_px - diam_px) / 2 + rng.uniform(-0.01, 0.01) * h_px)
    return w_px, h_px, diam_px, x0, y0


def _save_jpeg_atomic(img: Image.Image, path: pathlib.Path) -> None:
    """Write a JPEG under a temporary name, then rename, so a reader never sees half a file."""
    with atomic_write(path, "wb") as f:
        img.save(f, format="JPEG", quality=JPEG_QUALITY)


def _make_patient(args: tuple) -> tuple[dict, list[tuple]]:
    """Draw, render and write one patient's two images; return its sheet row and its regions.csv rows."""
    out_dir, index, seed, min_px, max_px = args
    rng = np.random.default_rng([seed, index])
    left, right = _draw_eye_diseases(rng)
    age = _draw_age(rng, set(left) | set(right))
    sex = "Male" if rng.random() < 0.53 else "Female"
    w_px, h_px, diam_px, x0, y0 = _draw_camera(rng, min_px, max_px)
    work_px = min(diam_px, WORK_PX)
    look = _Look(rng)
    scale = diam_px / work_px  # tile px → frame px
    region_rows = []
    for side, diseases in (("left", left), ("right", right)):
        drawn = []
        tile = _render_eye(rng, work_px, side == "right", look.jitter(rng), diseases, drawn)
        region_rows += [(index, side, k, sign, round(x0 + x * scale, 2), round(y0 + y * scale, 2),
                         round(r * scale, 2)) for k, sign, x, y, r in drawn]
        if diam_px != work_px:  # bilinear: 2x cheaper than bicubic, and the tile is already smooth
            tile = tile.resize((diam_px, diam_px), Image.BILINEAR)
        frame = Image.new("RGB", (w_px, h_px))
        frame.paste(tile, (x0, y0))
        _save_jpeg_atomic(frame, pathlib.Path(out_dir) / IMAGE_DIR / f"{index}_{side}.jpg")
    return _sheet_row(index, age, sex, left, right), region_rows


# ------------------------------------------------------------------------------------------- sheet
def _write_sheet_atomic(rows: list, path: pathlib.Path) -> None:
    """data.xlsx with the exact ODIR columns; timestamps pinned so the bytes depend only on the rows."""
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    buf = io.BytesIO()
    frame.to_excel(buf, index=False, engine="openpyxl")
    with atomic_write(path, "wb") as f:
        f.write(_pin_xlsx_timestamps(buf.getvalue()))


def _pin_xlsx_timestamps(xlsx: bytes) -> bytes:
    """Rewrite an xlsx (a zip) with fixed zip dates and document dates; openpyxl stamps 'now' in both."""
    stamp = "2019-01-01T00:00:00Z"  # the ODIR-2019 challenge year
    src, out = zipfile.ZipFile(io.BytesIO(xlsx)), io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename == "docProps/core.xml":
                data = re.sub(rb"(<dcterms:(created|modified)[^>]*>)[^<]*", rb"\g<1>" + stamp.encode(), data)
            dst.writestr(zipfile.ZipInfo(info.filename, date_time=(2019, 1, 1, 0, 0, 0)), data,
                         compress_type=zipfile.ZIP_DEFLATED)
    return out.getvalue()


# -------------------------------------------------------------------------------------------- API
def make_synthetic_odir(out_dir, n_patients=600, seed=0, min_px=400, max_px=900, workers=None) -> pathlib.Path:
    """Write a synthetic ODIR data set (data.xlsx + Training Images/) into out_dir; return out_dir.
    Deterministic for a seed (same bytes regardless of workers).

    Args:
        out_dir: folder to write into (created; files already there with the same names are replaced).
        n_patients: number of patients (rows); IDs are 0 .. n_patients - 1, two JPEGs each.
        seed: base seed; patient i draws from `np.random.default_rng([seed, i])`.
        min_px, max_px: range of image widths in px; heights follow from a 1:1, 4:3 or 3:2 frame.
        workers: worker processes (default: the usable cores); 1 draws in this process.
    """
    if n_patients < 1:
        raise ValueError(f"n_patients must be >= 1, got {n_patients}")
    if not 16 <= min_px <= max_px:
        raise ValueError(f"need 16 <= min_px <= max_px, got min_px={min_px}, max_px={max_px}")
    out_dir = pathlib.Path(out_dir)
    (out_dir / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    tasks = [(str(out_dir), i, seed, min_px, max_px) for i in range(n_patients)]
    workers = max(1, min(workers or usable_cores(), n_patients))
    bar = dict(total=n_patients, desc="synthetic ODIR", unit="patient", disable=not progress_enabled())
    if workers == 1:
        made = [_make_patient(t) for t in tqdm(tasks, **bar)]
    else:
        with ProcessPoolExecutor(workers) as pool:
            chunk = max(1, n_patients // (workers * 16))
            made = list(tqdm(pool.map(_make_patient, tasks, chunksize=chunk), **bar))
    regions = pd.DataFrame([r for _, rows in made for r in rows], columns=list(REGION_COLUMNS))
    with atomic_write(out_dir / REGIONS_NAME, newline="") as f:
        regions.to_csv(f, index=False)
    _write_sheet_atomic([row for row, _ in made], out_dir / SHEET_NAME)
    return out_dir


def read_regions(root) -> pd.DataFrame:
    """Where the localised signs of a synthetic set are drawn: one row per sign (a circle) with columns id, eye
    (left/right), class (D, G, A, O), sign ("blot", "exudates", "drusen", "cupped disc", "laser spot", "scar",
    "pigmented patch"), x_px, y_px, r_px (centre and radius, in pixels of the written JPEG). An eye's region for a
    class is the union of its circles.

    Raises:
        FileNotFoundError: no regions.csv (a set generated before regions were recorded: delete it to regenerate).
    """
    path = pathlib.Path(root) / REGIONS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no regions file; this synthetic set predates it, delete {root} and "
                                "generate it again")
    return pd.read_csv(path)


def ensure_synthetic_odir(root, n_patients=600, seed=0, min_px=400, max_px=900) -> pathlib.Path:
    """Return a cached synthetic set under root (a subfolder named from the parameters), generating it once.
    Completed sets carry a marker file written last, so an interrupted generation is redone, never half-used.

    A set is generated in a private temporary folder, marked, then renamed into place, so concurrent callers
    (e.g. several ranks) never see each other's partial output; a folder whose marker is missing is replaced.
    Temporary folders left by killed runs on this host are removed.
    """
    params = dict(n_patients=n_patients, seed=seed, min_px=min_px, max_px=max_px, version=GENERATOR_VERSION)
    final = pathlib.Path(root) / f"odir-synth-v{GENERATOR_VERSION}-n{n_patients}-seed{seed}-px{min_px}-{max_px}"
    if (final / MARKER_NAME).is_file():
        return final
    _remove_dead_tmp_dirs(final)
    tmp = final.with_name(f"{final.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    make_synthetic_odir(tmp, n_patients, seed, min_px, max_px)
    (tmp / MARKER_NAME).write_text(json.dumps(params, indent=1) + "\n")
    if final.exists() and not (final / MARKER_NAME).is_file():  # incomplete: never trust it
        shutil.rmtree(final)
    try:
        tmp.rename(final)
    except OSError:  # another process finished first: use its copy
        shutil.rmtree(tmp, ignore_errors=True)
        if not (final / MARKER_NAME).is_file():
            raise
    return final


def _remove_dead_tmp_dirs(final: pathlib.Path) -> None:
    """Delete `final`'s temporary folders whose generating process (on this host) no longer runs."""
    prefix = f"{final.name}.tmp-{socket.gethostname()}-"
    for tmp in final.parent.glob(prefix + "*"):
        try:
            os.kill(int(tmp.name[len(prefix):]), 0)  # signal 0: only checks that the pid exists
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except (ValueError, PermissionError):  # not our naming, or a live process of another user
            pass

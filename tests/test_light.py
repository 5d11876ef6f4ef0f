"""The light scoring path: numpy + Pillow preprocessing against DALI's validation path, and score.py with no
torch, DALI, timm or sklearn importable (what `pip install ".[score]"` gives)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from odir_dual.pipeline.constants import IMAGENET_STD
from odir_dual.pipeline.dali import eval_loader
from odir_dual.pipeline.light import load_eye, pil_batches
from test_export import tiny_checkpoint, tiny_onnx  # noqa: F401 (fixtures)
from test_score import pair_folder, read_csv

ROOT = Path(__file__).resolve().parents[1]
GREY = np.float32(255) * np.asarray(IMAGENET_STD, np.float32)[:, None, None]  # normalised units → grey levels
# Measured on 32 real 256-px images (2-core AMD EPYC): same size and small reductions mean 0.01 and 99th
# percentile 1.0 grey level; a 2x reduction mean 0.16, 99th percentile 1.0, a few edge pixels up to 13.
MEAN_GREY, P99_GREY = 0.25, 1.05
HEAVY = ("torch", "torchvision", "timm", "sklearn", "nvidia.dali", "onnx", "matplotlib")


def _dali_images(paths, img_px) -> np.ndarray:
    batches = [b[0] for b in eval_loader(paths, paths, 8, img_px, "cpu", num_threads=1)]
    return torch.cat(batches)[: len(paths)].numpy()


@pytest.fixture(scope="module")
def real_eyes(odir256, tmp_path_factory) -> list[str]:
    """16 real eyes: 8 as they are (256 × 256) and 8 cropped to 256 × 216 (prepared copies are rarely square)."""
    folder = odir256 / "Training Images"
    names = sorted(os.listdir(folder))[:16]
    out = tmp_path_factory.mktemp("eyes")
    paths = [str(folder / n) for n in names[:8]]
    for n in names[8:]:
        Image.open(folder / n).convert("RGB").crop((0, 20, 256, 236)).save(out / n, quality=95)
        paths.append(str(out / n))
    return paths


@pytest.mark.parametrize("img_px", [256, 224, 128])
def test_pil_preprocessing_matches_dali_on_real_images(real_eyes, img_px):
    dali = _dali_images(real_eyes, img_px)
    pil = np.stack([load_eye(p, img_px) for p in real_eyes])
    assert pil.shape == dali.shape == (16, 3, img_px, img_px)
    grey = np.abs(pil - dali) * GREY  # (16, 3, H, W) in 8-bit grey levels
    assert grey.mean() < MEAN_GREY
    assert np.quantile(grey, 0.99) < P99_GREY


def test_pil_batches_keep_order_and_pad(tmp_path):
    paths = []
    for i in range(5):  # image i is uniformly grey level 40 i: its row tells which image it is
        paths.append(str(tmp_path / f"{i}.jpg"))
        Image.fromarray(np.full((40, 50, 3), 40 * i, np.uint8)).save(paths[-1], quality=95)
    batches = list(pil_batches(paths, paths[::-1], 2, 32, mean=(0, 0, 0), std=(1, 1, 1), num_threads=2))
    assert [b[2].tolist() for b in batches] == [[0, 1], [2, 3], [4, -1]]
    left = np.concatenate([b[0] for b in batches])[:5]
    right = np.concatenate([b[1] for b in batches])[:5]
    assert left.shape == (5, 3, 32, 32) and left.dtype == np.float32
    np.testing.assert_allclose(left.mean(axis=(1, 2, 3)), [40 * i / 255 for i in range(5)], atol=2 / 255)
    np.testing.assert_allclose(right.mean(axis=(1, 2, 3)), [40 * (4 - i) / 255 for i in range(5)], atol=2 / 255)


def run_without_heavy_libraries(args, cache: Path) -> subprocess.CompletedProcess:
    """`python score.py ARGS` where torch, DALI, timm, sklearn, onnx and matplotlib cannot be imported."""
    block = "import sys\nfor m in %r: sys.modules[m] = None\n" % (HEAVY,)
    code = block + "import runpy\nsys.argv = ['score.py', *sys.argv[1:]]\nrunpy.run_path('score.py', run_name='__main__')"
    env = {**os.environ, "ODIR_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_score_runs_without_torch_dali_or_sklearn_and_agrees(tiny_onnx, tmp_path):
    from odir_dual import score

    folder = pair_folder(tmp_path / "images", [4, 2, 9, 13, 5, 6, 7])
    light = run_without_heavy_libraries([tiny_onnx["path"], folder, "-o", tmp_path / "light.csv"], tmp_path / "c")
    assert light.returncode == 0, light.stderr
    assert "pil loader" in light.stdout and "scored 7 of 7 patients" in light.stdout
    full = score.score_folder(tiny_onnx["path"], folder, out=tmp_path / "full.csv", loader="dali",
                              cache_dir=tmp_path / "c" / "prepared", workers=1, progress=False, log=lambda *a: None)
    rows = read_csv(tmp_path / "light.csv")
    assert [r["ID"] for r in rows] == [str(i) for i in full["frame"]["ID"]]
    probs = np.array([[float(r[f"p_{c}"]) for c in score.CLASSES] for r in rows])
    assert np.abs(probs - full["probs"]).max() < 2e-3  # one grey level of input difference, at most


def test_loader_dali_refused_without_dali(tiny_onnx, tmp_path):
    folder = pair_folder(tmp_path / "images", [1])
    proc = run_without_heavy_libraries([tiny_onnx["path"], folder, "--loader", "dali"], tmp_path / "c")
    assert proc.returncode != 0 and "--loader dali: needs torch and nvidia-dali" in proc.stderr

"""GPU-only checks: DALI's GPU decoding against its CPU decoding; train.py's fast preset (compiled, bf16, DALI
decoding on the GPU) for one epoch with a finite loss; onnxruntime's CUDA provider against its CPU provider.
Skipped without CUDA. And, in the slow suite on any machine, benchmarks/gpu_check.sh's dry run on the CPU, so the
script that runs all of this on a GPU host cannot rot unseen.

    python -m pytest -m gpu tests/test_gpu.py -q        # what benchmarks/gpu_check.sh runs
    python -m pytest -m slow tests/test_gpu.py -q       # the dry run (.ci/run runs the slow suite)
"""
import csv
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

ROOT = Path(__file__).resolve().parents[1]
ODIR256 = ROOT.parent / "shared/data/odir5k-256"  # as in conftest.py

IMG_PX = 224
# nvJPEG (CUDA or the hardware decoder) and libjpeg-turbo differ in IDCT rounding and chroma upsampling by a grey
# level or two; the antialiased resize averages most of that away. One 8-bit grey level is ~0.017 in normalised
# units, so these bounds allow a mean of ~1 level and a 99th percentile of ~6 levels while a wrong colour order,
# orientation, crop or normalisation (differences of 0.3 and more) fails. Measured values are printed (-s).
DECODE_MEAN_ABS = 0.02
DECODE_P99_ABS = 0.10
ORT_ATOL = 1e-3


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """(left paths, right paths): the real 256-px ODIR subset when present, else synthetic originals of
    mixed sizes (up to 2592 px wide, so the hardware JPEG decoder gets large images too)."""
    from odir_dual.pipeline.odir import read_patients
    from odir_dual.pipeline.synthetic import make_synthetic_odir

    if (ODIR256 / "data.xlsx").is_file():
        patients, _ = read_patients(ODIR256)
        patients = patients.head(32)
    else:
        folder = make_synthetic_odir(tmp_path_factory.mktemp("odir"), n_patients=16, seed=3, min_px=400,
                                     max_px=2592)
        patients, _ = read_patients(folder)
    return list(patients["left"]), list(patients["right"])


@pytest.mark.gpu
@needs_cuda
def test_gpu_decoding_matches_cpu_decoding(pairs):
    from odir_dual.pipeline.dali import eval_loader

    left, right = pairs
    gpu = eval_loader(left, right, 8, IMG_PX, "cuda", dtype=torch.float32)
    cpu = eval_loader(left, right, 8, IMG_PX, "cpu", dtype=torch.float32)
    diffs = []
    for (gl, gr, _, gi), (cl, cr, _, ci) in zip(gpu, cpu):
        assert gl.is_cuda and gl.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(gi.cpu(), ci.cpu())
        diffs.append(torch.cat([(gl.cpu() - cl).abs().flatten(), (gr.cpu() - cr).abs().flatten()]))
    d = torch.cat(diffs)
    mean, p99, mx = float(d.mean()), float(torch.quantile(d[::13], 0.99)), float(d.max())
    print(f"\nGPU vs CPU decoding, {len(left)} pairs at {IMG_PX} px: mean |d| {mean:.4f}, p99 {p99:.4f}, "
          f"max {mx:.4f} (normalised units; 1 grey level ~ 0.017)")
    assert mean < DECODE_MEAN_ABS, f"mean |GPU - CPU| {mean:.4f} >= {DECODE_MEAN_ABS}"
    assert p99 < DECODE_P99_ABS, f"99th percentile |GPU - CPU| {p99:.4f} >= {DECODE_P99_ABS}"


@pytest.mark.gpu
@needs_cuda
def test_fast_preset_trains_compiled_bf16_on_gpu(tmp_path):
    """train.py itself, fast preset (bf16 autocast, channels_last, torch.compile, DALI GPU decoding), one epoch
    of a tiny backbone: the run finishes, validates, writes best.pt, and its loss is finite."""
    from odir_dual.training import engine
    from odir_dual import train
    from odir_dual.pipeline.synthetic import make_synthetic_odir

    assert engine.autocast_dtype("auto", torch.device("cuda")) == torch.bfloat16, "this GPU has no bf16"
    data = make_synthetic_odir(tmp_path / "odir", n_patients=40, seed=5, min_px=96, max_px=192, workers=2)
    ckpt = train.main(["--preset", "fast", "--data", str(data), "--out", str(tmp_path), "--name", "run",
                       "--cache-dir", str(tmp_path / "cache"), "--backbone", "test_convnext", "--no-pretrained",
                       "--img-px", "64", "--embed-dim", "32", "--heads", "4", "--batch-size", "8", "--epochs", "1",
                       "--loader-threads", "2"])
    assert ckpt is not None, "no best.pt: the epoch did not complete"
    cfg = ckpt["config"]
    assert cfg["compile"] and cfg["channels_last"] and cfg["precision"] == "auto"
    with open(tmp_path / "run" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and math.isfinite(float(rows[0]["train_loss"])) and math.isfinite(float(rows[0]["val_loss"]))


def _tiny_onnx(path):
    """A tiny DualEyeNet in eval mode exported to ONNX (batch dimension dynamic); returns the model."""
    from odir_dual.model import DualEyeNet

    model = DualEyeNet("test_convnext", embed_dim=32, heads=4).eval()
    x = (torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64))
    kw = dict(input_names=["left", "right"], output_names=["logits"])
    try:  # the TorchScript exporter needs only `onnx`; the dynamo one also needs onnxscript
        torch.onnx.export(model, x, str(path), dynamo=False, opset_version=17,
                          dynamic_axes={"left": {0: "batch"}, "right": {0: "batch"}, "logits": {0: "batch"}}, **kw)
    except Exception:  # noqa: BLE001
        torch.onnx.export(model, x, str(path), dynamo=True, **kw)
    return model


@pytest.mark.gpu
@needs_cuda
def test_onnxruntime_cuda_provider_matches_cpu(tmp_path):
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):  # CUDA/cuDNN libraries from the pip packages torch brought
        ort.preload_dlls()
    assert "CUDAExecutionProvider" in ort.get_available_providers(), (
        f"onnxruntime {ort.__version__} from {ort.__file__} has no CUDA provider: install onnxruntime-gpu")
    path = tmp_path / "tiny.onnx"
    model = _tiny_onnx(path)
    cuda = ort.InferenceSession(str(path), providers=[("CUDAExecutionProvider", {"use_tf32": 0}),
                                                      "CPUExecutionProvider"])
    assert cuda.get_providers()[0] == "CUDAExecutionProvider", (
        f"the CUDA provider did not load (providers: {cuda.get_providers()}); see onnxruntime's log above")
    cpu = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feed = {n: rng.standard_normal((5, 3, 64, 64)).astype(np.float32) for n in ("left", "right")}
    out_cuda = cuda.run(None, feed)[0]
    out_cpu = cpu.run(None, feed)[0]
    with torch.no_grad():
        out_torch = model(torch.from_numpy(feed["left"]), torch.from_numpy(feed["right"])).numpy()
    print(f"\nonnxruntime CUDA vs CPU: max |d| {np.abs(out_cuda - out_cpu).max():.2e}; CPU vs torch "
          f"{np.abs(out_cpu - out_torch).max():.2e}")
    assert out_cuda.shape == (5, 8)
    np.testing.assert_allclose(out_cuda, out_cpu, atol=ORT_ATOL, rtol=0)
    np.testing.assert_allclose(out_cpu, out_torch, atol=ORT_ATOL, rtol=0)



DRY_RUN_TIMEOUT_S = 1000  # a CPU dry run's own budget: 2 × 465 s (GPU_CHECK_BUDGET_S), + 5 s per stage to be killed


def _copy_of_the_project(dst: Path) -> Path:
    """What gpu_check.sh runs (the scripts, packages, benchmarks, tests, pyproject.toml), copied: its benchmarks
    write benchmarks/results/*.json beside themselves, and those files in the repository hold measured figures."""
    skip = shutil.ignore_patterns("__pycache__", "gpu_check")
    dst.mkdir()
    for path in ROOT.iterdir():
        if path.is_file() and path.suffix in (".py", ".toml"):
            shutil.copy2(path, dst / path.name)
        elif path.name in ("benchmarks", "tests") or (path / "__init__.py").is_file():
            shutil.copytree(path, dst / path.name, ignore=skip)
    return dst


@pytest.mark.slow
def test_gpu_check_dry_run_on_the_cpu(tmp_path):
    """`GPU_CHECK_DEVICE=cpu bash benchmarks/gpu_check.sh`: every stage of the GPU host check (preflight, GPU
    tests, loader, train_step, candidates, end_to_end) runs with small CPU settings and passes, and the summary
    reads every result file back. 3 min 47 s to 7 min 56 s on a 2-core Intel Xeon shared with other jobs (load
    average 4-16), with an empty cache."""
    repo = _copy_of_the_project(tmp_path / "repo")
    link = tmp_path / "path"
    link.mkdir()
    (link / "odir_dual").symlink_to(repo)  # `import odir_dual` is the copy, as the script's own link would do
    env = {k: v for k, v in os.environ.items() if k != "OUT"}  # OUT: the script would copy its results there
    env.update(GPU_CHECK_DEVICE="cpu", PYTHON=sys.executable, ODIR_CACHE=str(tmp_path / "cache"),
               CUDA_VISIBLE_DEVICES="", PYTHONPATH=os.pathsep.join(filter(None, [str(link), env.get("PYTHONPATH")])))
    p = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=repo, env=env, capture_output=True, text=True,
                       timeout=DRY_RUN_TIMEOUT_S)
    out = p.stdout + p.stderr
    print(out)
    assert p.returncode == 0, out[-4000:]
    for stage in ("tests", "loader", "train_step", "candidates", "end_to_end"):
        assert f"--- {stage}: ok in" in out, f"stage {stage} did not pass:\n{out[-4000:]}"
    assert "training, fast preset fed by DALI" in out and "candidates against fast" in out, out[-4000:]  # summary
    assert "failed stages: none; skipped for time: none; summary rc 0" in out, out[-2000:]

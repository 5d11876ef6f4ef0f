"""score.py: export-then-score round trips on a tiny model, bad inputs, submission format, TTA, labelled folders."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import runtime
import score
from pipeline import pairs
from pipeline.constants import CLASSES
from test_export import MEAN, STD, THRESHOLDS, tiny_checkpoint, tiny_net, tiny_onnx  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parents[1]


def fundus(path: Path, seed: int, size=(112, 96), symmetric: bool = False) -> Path:
    """A small fundus-like image: a textured orange disc on black (the prepare step finds and crops the disc)."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[:h, :w]
    disc = (xx - (w - 1) / 2) ** 2 + (yy - (h - 1) / 2) ** 2 < (0.45 * min(w, h)) ** 2
    tex = rng.integers(60, 250, (h, w, 3)).astype(np.float32) * np.float32([1.0, 0.6, 0.3])
    if symmetric:
        tex = (tex + tex[:, ::-1]) / 2
    img = np.where(disc[..., None], tex, 0).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, quality=95) if path.suffix.lower() in (".jpg", ".jpeg") else \
        Image.fromarray(img).save(path)
    return path


def pair_folder(folder: Path, ids, start_seed: int = 0) -> Path:
    for k, pid in enumerate(ids):
        fundus(folder / f"{pid}_left.jpg", start_seed + 2 * k)
        fundus(folder / f"{pid}_right.jpg", start_seed + 2 * k + 1)
    return folder


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def reference_probs(ckpt_path: Path, table: pd.DataFrame, batch_size: int = 3) -> np.ndarray:
    """PyTorch probabilities of the ok patients of a prepared table, through the same DALI loader as score.py."""
    from pipeline.dali import eval_loader

    ok = table[table["status"] == "ok"]
    net = tiny_net(ckpt_path)
    out = np.zeros((len(ok), len(CLASSES)), np.float32)
    loader = eval_loader(list(ok["left_prepared"]), list(ok["right_prepared"]), batch_size, 64, "cpu",
                         mean=MEAN, std=STD)
    with torch.no_grad():
        for left, right, _, index in loader:
            keep = index >= 0
            out[index[keep].numpy()] = torch.sigmoid(net(left, right))[keep].numpy()
    return out


def run_score(*args, cache: Path) -> subprocess.CompletedProcess:
    """`python score.py ...` in a fresh process (the real command line: import side effects, warnings)."""
    env = {**os.environ, "ODIR_CACHE": str(cache), "PYTHONWARNINGS": "default"}
    return subprocess.run([sys.executable, str(ROOT / "score.py"), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


# ----------------------------------------------------------------------------------------------- round trip


def test_round_trip_matches_pytorch_and_is_quiet(tiny_onnx, tmp_path):
    folder = pair_folder(tmp_path / "images", [25, 3, 100, 7, 1])
    fundus(folder / "8_LEFT.JPG", 20), fundus(folder / "8_Right.png", 21)  # any case, png too
    out = tmp_path / "pred.csv"
    proc = run_score(tiny_onnx["path"], folder, "-o", out, "--batch-size", "4", cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr
    # no onnxruntime provider/graph warnings on a CPU machine (and no CUDA provider noise)
    noisy = [line for line in proc.stderr.splitlines() if "onnxruntime" in line.lower() or "[W:" in line
             or "CUDAExecutionProvider" in line]
    assert not noisy, noisy
    assert "scored 6 of 6 patients" in proc.stdout

    rows = read_csv(out)
    assert [r["ID"] for r in rows] == ["1", "3", "7", "8", "25", "100"]  # every patient, numeric ID order
    assert list(rows[0]) == ["ID", *CLASSES, *(f"pred_{c}" for c in CLASSES), "labels", "status"]
    assert all(r["status"] == "ok" for r in rows)
    probs = np.array([[float(r[c]) for c in CLASSES] for r in rows])
    table = pairs.prepare_pairs(pairs.find_pairs(folder)[0], tmp_path / "cache" / "prepared", 64, workers=1,
                                progress=False)
    np.testing.assert_allclose(probs, reference_probs(tiny_onnx["checkpoint"], table), atol=1e-4, rtol=0)
    # decisions at the model's tuned thresholds, and the label string built from them
    pred = np.array([[int(r[f"pred_{c}"]) for c in CLASSES] for r in rows])
    np.testing.assert_array_equal(pred, (probs > THRESHOLDS).astype(int))
    assert [r["labels"] for r in rows] == [",".join(c for c, p in zip(CLASSES, row) if p) for row in pred]


def test_bad_inputs_are_reported_and_the_rest_scored(tiny_onnx, tmp_path, capsys):
    folder = pair_folder(tmp_path / "images", [1, 2, 3])
    good = (folder / "1_left.jpg").read_bytes()
    (folder / "4_left.jpg").write_bytes(good[: len(good) // 2])  # truncated JPEG
    fundus(folder / "4_right.jpg", 40)
    (folder / "5_left.jpg").write_text("not a photograph\n")  # a text file named .jpg
    fundus(folder / "5_right.jpg", 50)
    fundus(folder / "6_left.jpg", 60)  # only a left eye
    (folder / "notes.txt").write_text("clinic notes\n")  # a stray non-image file
    (folder / "7_left.jpg").write_bytes(b"")  # empty file
    fundus(folder / "7_right.jpg", 70)
    out = tmp_path / "pred.csv"
    assert score.main([str(tiny_onnx["path"]), str(folder), "-o", str(out), "--cache", str(tmp_path / "c"),
                       "--workers", "1"]) == 0
    text = capsys.readouterr().out
    rows = {r["ID"]: r for r in read_csv(out)}
    assert list(rows) == ["1", "2", "3", "4", "5", "6", "7"]
    assert all(rows[i]["status"] == "ok" and rows[i]["N"] for i in "123")
    assert rows["4"]["status"] == "left eye: truncated JPEG (4_left.jpg)"
    assert rows["5"]["status"] == "left eye: not an image (5_left.jpg)"
    assert rows["6"]["status"] == "right eye: missing file"
    assert rows["7"]["status"] == "left eye: empty file (7_left.jpg)"
    for i in "4567":  # not scored: blank probabilities and decisions
        assert rows[i]["N"] == "" and rows[i]["pred_N"] == "" and rows[i]["labels"] == ""
    assert "scored 3 of 7 patients; not scored 4:" in text
    assert "ID 4: left eye: truncated JPEG" in text and "ID 6: right eye: missing file" in text
    assert "notes.txt" in text and "ignored 1 file" in text


def test_submission_format_is_exact(tiny_onnx, tmp_path):
    folder = pair_folder(tmp_path / "images", [12, 2])
    fundus(folder / "5_left.jpg", 9)  # one eye only: not in the submission
    out = tmp_path / "submission.csv"
    assert score.main([str(tiny_onnx["path"]), str(folder), "-o", str(out), "--submission",
                       "--cache", str(tmp_path / "c"), "--workers", "1"]) == 0
    lines = out.read_text().splitlines()
    assert lines[0] == "ID,N,D,G,C,A,H,M,O"
    assert [line.split(",")[0] for line in lines[1:]] == ["2", "12"]
    for line in lines[1:]:
        cells = line.split(",")
        assert len(cells) == 9 and all(0.0 <= float(v) <= 1.0 for v in cells[1:])


# ----------------------------------------------------------------------------------------------- TTA


class _FakeLoader:
    """Stands in for pipeline.dali.eval_loader: fixed batches, last one padded with index -1."""

    def __init__(self, left, right, batch_size):
        self.batches = []
        n = len(left)
        for i in range(0, n, batch_size):
            idx = torch.arange(i, i + batch_size)
            keep = idx < n
            take = torch.where(keep, idx, 0)
            self.batches.append((left[take], right[take], torch.zeros(batch_size, 8), torch.where(keep, idx, -1)))

    def __iter__(self):
        return iter(self.batches)


def _tta_probs(monkeypatch, session, meta, left, right, tta):
    import pipeline.dali

    monkeypatch.setattr(pipeline.dali, "eval_loader", lambda *a, **k: _FakeLoader(left, right, 2))
    return score.score_pairs(session, meta, ["x"] * len(left), ["y"] * len(left), batch_size=2, tta=tta,
                             device="cpu", progress=False)


def test_tta_averages_the_horizontal_flip(tiny_onnx, monkeypatch):
    session, meta, _ = runtime.load_session(tiny_onnx["path"], "cpu")
    g = torch.Generator().manual_seed(3)
    half = torch.randn(3, 3, 64, 32, generator=g)
    symmetric = torch.cat([half, half.flip(3)], dim=3)  # (3, 3, 64, 64), mirror-symmetric in W
    plain = _tta_probs(monkeypatch, session, meta, symmetric, symmetric * 0.5, tta=False)
    flipped = _tta_probs(monkeypatch, session, meta, symmetric, symmetric * 0.5, tta=True)
    np.testing.assert_allclose(flipped, plain, atol=1e-6)  # a flip-symmetric input: TTA changes nothing

    left, right = (torch.randn(3, 3, 64, 64, generator=g) for _ in range(2))
    tta = _tta_probs(monkeypatch, session, meta, left, right, tta=True)
    run = lambda a, b: session.run(["probs"], {"left": a.numpy(), "right": b.numpy()})[0]  # noqa: E731
    expected = (run(left, right) + run(left.flip(3).contiguous(), right.flip(3).contiguous())) / 2
    np.testing.assert_allclose(tta, expected, atol=1e-6)
    assert np.abs(tta - run(left, right)).max() > 1e-5  # and it does change an asymmetric input


def test_tta_flag_end_to_end(tiny_onnx, tmp_path):
    folder = pair_folder(tmp_path / "images", [1, 2, 3])
    fundus(folder / "9_left.png", 90, symmetric=True), fundus(folder / "9_right.png", 91, symmetric=True)
    common = ["--cache", str(tmp_path / "c"), "--workers", "1"]
    assert score.main([str(tiny_onnx["path"]), str(folder), "-o", str(tmp_path / "a.csv"), *common]) == 0
    assert score.main([str(tiny_onnx["path"]), str(folder), "-o", str(tmp_path / "b.csv"), "--tta", *common]) == 0
    a = {r["ID"]: np.array([float(r[c]) for c in CLASSES]) for r in read_csv(tmp_path / "a.csv")}
    b = {r["ID"]: np.array([float(r[c]) for c in CLASSES]) for r in read_csv(tmp_path / "b.csv")}
    assert max(np.abs(a[i] - b[i]).max() for i in "123") > 1e-5
    # a mirror-symmetric photograph stays (nearly: JPEG re-encoding of the prepared copy) mirror-symmetric
    assert np.abs(a["9"] - b["9"]).max() < 1e-3


# ----------------------------------------------------------------------------------------------- labelled folders


def test_folder_with_sheet_prints_metrics_and_odir_score(tiny_onnx, tmp_path, capsys):
    root = tmp_path / "odir"
    rng = np.random.default_rng(0)
    rows = []
    for k, pid in enumerate([4, 11, 2, 8, 15, 6]):
        fundus(root / "images" / f"{pid}_left.jpg", 2 * k), fundus(root / "images" / f"{pid}_right.jpg", 2 * k + 1)
        labels = rng.integers(0, 2, len(CLASSES))
        rows.append({"ID": pid, "Left-Fundus": f"{pid}_left.jpg", "Right-Fundus": f"{pid}_right.jpg",
                     **dict(zip(CLASSES, labels.tolist()))})
    rows.append({"ID": 30, "Left-Fundus": "30_left.jpg", "Right-Fundus": "30_right.jpg",
                 **dict.fromkeys(CLASSES, 0), "N": 1})  # named in the sheet, right image absent
    fundus(root / "images" / "30_left.jpg", 99)
    pd.DataFrame(rows).to_csv(root / "sheet.csv", index=False)
    out = tmp_path / "pred.csv"
    assert score.main([str(tiny_onnx["path"]), str(root), "-o", str(out), "--cache", str(tmp_path / "c"),
                       "--workers", "1"]) == 0
    text = capsys.readouterr().out
    assert "official ODIR-2019 score" in text and "final" in text
    assert "F1 micro" in text and "F1 macro" in text and "tuned thresholds" in text
    got = read_csv(out)
    assert [r["ID"] for r in got] == ["2", "4", "6", "8", "11", "15", "30"]
    assert got[-1]["status"].startswith("right eye: missing file")
    by_id = {r["ID"]: r for r in got}
    for r in rows[:-1]:
        assert by_id[str(r["ID"])]["true_labels"] == ",".join(c for c in CLASSES if r[c])


# ----------------------------------------------------------------------------------------------- errors


def test_not_our_model_is_a_clear_error(tmp_path, capsys):
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    foreign = tmp_path / "foreign.onnx"
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # a valid model onnxruntime loads, just not ours
    onnx.save(model, str(foreign))
    text = tmp_path / "text.onnx"
    text.write_text("hello\n")
    folder = pair_folder(tmp_path / "images", [1])
    for path, message in ((foreign, "not an odir-dual ONNX model"), (text, "not a loadable ONNX model"),
                          (tmp_path / "absent.onnx", "no such model file")):
        with pytest.raises(runtime.ModelFileError, match=message):
            runtime.load_session(path, "cpu")
        assert score.main([str(path), str(folder), "-o", str(tmp_path / "p.csv")]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("score.py: error:") and path.name in err[0]
    assert not (tmp_path / "p.csv").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine")
def test_cuda_provider_refused_without_a_gpu(tiny_onnx):
    assert runtime.resolve_provider("auto") == "cpu"
    with pytest.raises(SystemExit, match="--provider cuda"):
        runtime.load_session(tiny_onnx["path"], "cuda")
    session, _, provider = runtime.load_session(tiny_onnx["path"], "auto")
    assert provider == "cpu" and session.get_providers() == ["CPUExecutionProvider"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_io_binding_matches_cpu(tiny_onnx, tmp_path):
    folder = pair_folder(tmp_path / "images", [1, 2, 3, 4, 5])
    common = dict(cache_dir=tmp_path / "c", batch_size=2, progress=False, workers=1, log=lambda *a: None)
    cpu = score.score_folder(tiny_onnx["path"], folder, out=tmp_path / "cpu.csv", provider="cpu", **common)
    gpu = score.score_folder(tiny_onnx["path"], folder, out=tmp_path / "gpu.csv", provider="cuda", tta=True, **common)
    assert gpu["provider"] == "cuda"
    gpu_plain = score.score_folder(tiny_onnx["path"], folder, out=tmp_path / "g2.csv", provider="cuda", **common)
    # GPU decoding (nvJPEG) and resize may differ from the CPU path by a few grey levels: a loose bound
    np.testing.assert_allclose(gpu_plain["probs"], cpu["probs"], atol=2e-2)
    assert np.abs(gpu["probs"] - gpu_plain["probs"]).max() > 0

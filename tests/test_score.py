"""score.py: export-then-score round trips on a tiny model, bad inputs, submission format, TTA, labelled folders."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from odir_dual.deploy import runtime
from odir_dual import score
from odir_dual.deploy import predictions
from odir_dual.pipeline import pairs
from odir_dual.pipeline.constants import CLASSES
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
    from odir_dual.pipeline.dali import eval_loader

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
    assert list(rows[0]) == ["ID", *(f"p_{c}" for c in CLASSES), *(f"pred_{c}" for c in CLASSES), "labels", "status"]
    assert all(predictions.is_scored(r["status"]) for r in rows)
    probs = np.array([[float(r[f"p_{c}"]) for c in CLASSES] for r in rows])
    table = pairs.prepare_pairs(pairs.find_pairs(folder).table, tmp_path / "cache" / "prepared", 64, workers=1,
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
    assert all(predictions.is_scored(rows[i]["status"]) and rows[i]["p_N"] for i in "123")
    assert rows["4"]["status"] == "left eye: truncated JPEG (4_left.jpg)"
    assert rows["5"]["status"] == "left eye: not an image (5_left.jpg)"
    assert rows["6"]["status"] == "right eye: no photograph"
    assert rows["7"]["status"] == "left eye: empty file (7_left.jpg)"
    for i in "4567":  # not scored: blank probabilities and decisions
        assert rows[i]["p_N"] == "" and rows[i]["pred_N"] == "" and rows[i]["labels"] == ""
    assert "scored 3 of 7 patients; not scored 4:" in text
    assert "ID 4: left eye: truncated JPEG" in text and "ID 6: right eye: no photograph" in text
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
    from odir_dual.pipeline import dali

    monkeypatch.setattr(dali, "eval_loader", lambda *a, **k: _FakeLoader(left, right, 2))
    return score.score_pairs(session, meta, ["x"] * len(left), ["y"] * len(left), batch_size=2, tta=tta,
                             device="cpu", progress=False)[0]


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
    a = {r["ID"]: np.array([float(r[f"p_{c}"]) for c in CLASSES]) for r in read_csv(tmp_path / "a.csv")}
    b = {r["ID"]: np.array([float(r[f"p_{c}"]) for c in CLASSES]) for r in read_csv(tmp_path / "b.csv")}
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
    with pytest.raises(runtime.ProviderError, match="--provider cuda"):
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


# ----------------------------------------------------------------------------------------------- naming, pairing


@pytest.mark.parametrize("left, right", [
    ("12_left.jpg", "12_right.jpg"), ("12_LEFT.JPG", "12_Right.png"),      # the ODIR convention, any case
    ("12-L.jpg", "12-R.jpg"), ("12_l.jpeg", "12_r.jpeg"), ("12.L.png", "12.R.png"), ("12 l.jpg", "12 r.jpg"),
    ("12_OS.jpg", "12_OD.jpg"), ("12-os.png", "12-od.png"), ("12 OS.jpg", "12 OD.jpg"),  # OD right, OS left
    ("12.Left.jpg", "12.Right.jpg"), ("12 left.jpg", "12-right.jpg"),      # separators may differ between eyes
])
def test_common_naming_conventions_pair_left_and_right(tmp_path, left, right):
    for name in (left, right):
        (tmp_path / name).write_bytes(b"x")
    found = pairs.find_pairs(tmp_path)
    table, ignored = found.table, found.ignored
    assert ignored == [] and not found.labelled and table["id"].tolist() == ["12"] and table["status"].tolist() == ["ok"]
    assert Path(table["left"][0]).name == left and Path(table["right"][0]).name == right


def test_od_is_the_right_eye_and_ids_may_hold_separators(tmp_path):
    for name in ("P-1_OD.jpg", "P-1_OS.jpg", "a b.c_left.png", "a b.c_right.png"):
        (tmp_path / name).write_bytes(b"x")
    table = pairs.find_pairs(tmp_path).table
    by_id = table.set_index("id")
    assert Path(by_id.loc["P-1", "right"]).name == "P-1_OD.jpg" and Path(by_id.loc["P-1", "left"]).name == "P-1_OS.jpg"
    assert set(by_id.index) == {"P-1", "a b.c"} and (by_id["status"] == "ok").all()


def test_unpaired_images_become_rows_with_their_reason(tmp_path):
    for name in ("1_left.jpg", "1_right.jpg", "IMG_0042.jpg", "2_left.png", "scan3.JPG", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    found = pairs.find_pairs(tmp_path)
    table, ignored = found.table, found.ignored
    status = dict(zip(table["id"], table["status"]))
    assert status["1"] == "ok" and status["2"] == "right eye: no photograph"
    for name in ("IMG_0042.jpg", "scan3.JPG"):  # images that name no eye: a row each, not just an "ignored" line
        assert status[name].startswith("not paired: the name does not say the patient and the eye")
        assert "_OD/_OS" in status[name]
    assert [name for name, _ in ignored] == ["notes.txt"]  # not an image: ignored, as before


@pytest.mark.parametrize("pattern, names, expected", [
    ("{id}_{eye}.jpg", ["7_left.jpg", "7_right.jpg"], {"7": ("7_left.jpg", "7_right.jpg")}),
    ("scan {id} ({eye}).*", ["scan 9 (OS).png", "scan 9 (OD).png"], {"9": ("scan 9 (OS).png", "scan 9 (OD).png")}),
    ("{id}_{eye:1=right,2=left}_*.jpg", ["55_2_2024.jpg", "55_1_2024.jpg"], {"55": ("55_2_2024.jpg", "55_1_2024.jpg")}),
    ("{eye}-{id}.jpg", ["L-x1.jpg", "R-x1.jpg", "x1_left.jpg"], {"x1": ("L-x1.jpg", "R-x1.jpg")}),
])
def test_pattern_pairs_other_naming_schemes(tmp_path, pattern, names, expected):
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    table = pairs.find_pairs(tmp_path, pattern).table
    got = {r.id: (Path(r.left).name, Path(r.right).name) for r in table.itertuples() if r.status == "ok"}
    assert got == expected
    # a file the pattern does not describe is a row saying so, naming the pattern
    assert all(f"--pattern {pattern}" in s for s in table.loc[table["status"] != "ok", "status"])


@pytest.mark.parametrize("bad", ["{id}.jpg", "{id}_{eye}_{eye}.jpg", "{id}_{eye:1=right}.jpg",
                                 "{id}_{eye:1=up,2=left}"])
def test_bad_patterns_are_refused_with_an_example(bad):
    with pytest.raises(ValueError, match="--pattern"):
        pairs.NamePattern(bad)


def test_normal_together_with_a_disease_is_flagged():
    table = pd.DataFrame({"id": [1, 2, 3], "status": ["ok", "ok", "ok"]})
    thr = np.full(len(CLASSES), 0.5)
    probs = {0: np.array([0.9, 0.8, 0, 0, 0, 0.7, 0, 0]), 1: np.array([0.9, 0, 0, 0, 0, 0, 0, 0]),
             2: np.array([0.1, 0.8, 0, 0, 0, 0, 0, 0])}
    frame = predictions.predictions_frame(table, probs, {"classes": list(CLASSES), "thresholds": thr})
    assert frame["status"].tolist() == ["ok; normal together with D,H", "ok", "ok"]
    lines = predictions.status_summary(frame, [])
    assert lines[0] == "scored 3 of 3 patients" and lines[1].startswith("flagged 1 of 3 scored patients")


# ----------------------------------------------------------------------------------------------- run folder, outputs


def test_run_folder_argument_uses_its_best_onnx_or_says_to_export(tiny_onnx, tmp_path, capsys):
    run = tiny_onnx["path"].parent
    assert score.resolve_model(run) == run / "best.onnx"
    folder = pair_folder(tmp_path / "images", [1, 2])
    out = tmp_path / "pred.csv"
    assert score.main([str(run), str(folder), "-o", str(out), "--cache-dir", str(tmp_path / "c"),
                       "--workers", "1"]) == 0
    assert [r["ID"] for r in read_csv(out)] == ["1", "2"]
    only_pt = tmp_path / "run2"
    only_pt.mkdir()
    (only_pt / "best.pt").write_bytes(tiny_onnx["checkpoint"].read_bytes())
    capsys.readouterr()
    assert score.main([str(only_pt), str(folder), "-o", str(tmp_path / "p2.csv")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"score.py: error: {only_pt} has no best.onnx yet: run `python export.py {only_pt}` first"]


def test_xlsx_is_a_real_workbook_with_the_thresholds_and_csv_gets_a_sidecar(tiny_onnx, tmp_path):
    from openpyxl import load_workbook

    folder = pair_folder(tmp_path / "images", [3, 1])
    for eye, seed in (("OS", 10), ("OD", 11)):  # an OD/OS-named patient
        fundus(folder / f"P7_{eye}.jpg", seed)
    fundus(folder / "IMG_0042.jpg", 12)  # an image that names no eye
    common = ["--cache-dir", str(tmp_path / "c"), "--workers", "1"]
    assert score.main([str(tiny_onnx["path"]), str(folder), "-o", str(tmp_path / "r.xlsx"), *common]) == 0
    assert score.main([str(tiny_onnx["path"]), str(folder), "-o", str(tmp_path / "r.csv"), *common]) == 0
    assert (tmp_path / "r.xlsx").read_bytes()[:2] == b"PK"  # a zip container, not CSV text
    wb = load_workbook(tmp_path / "r.xlsx")
    assert wb.sheetnames == ["predictions", "model"]
    got = [list(r) for r in wb["predictions"].iter_rows(values_only=True)]
    rows = read_csv(tmp_path / "r.csv")
    assert got[0] == list(rows[0])  # the same columns as the CSV
    assert [r[0] for r in got[1:]] == [r["ID"] for r in rows] == ["1", "3", "IMG_0042.jpg", "P7"]
    for g, r in zip(got[1:], rows):  # numbers as numbers, the same values
        if r["p_N"]:
            assert all(isinstance(v, float) for v in g[1:9])
            assert list(g[1:9]) == pytest.approx([float(r[f"p_{c}"]) for c in CLASSES], abs=1e-8)
        else:
            assert list(g[1:9]) == [None] * 8
        assert g[-1] == r["status"]
    assert rows[2]["status"].startswith("not paired") and predictions.is_scored(rows[3]["status"])
    model = {r[0]: r for r in wb["model"].iter_rows(values_only=True) if r[0]}
    assert [model[c][2] for c in CLASSES] == pytest.approx(list(THRESHOLDS))
    side = json.loads((tmp_path / "r.thresholds.json").read_text())
    assert list(side["thresholds"]) == list(CLASSES)
    assert list(side["thresholds"].values()) == pytest.approx(list(THRESHOLDS))
    assert side["model"] == str(tiny_onnx["path"])


def test_pattern_flag_end_to_end(tiny_onnx, tmp_path):
    folder = tmp_path / "images"
    for pid in ("a", "b"):
        fundus(folder / f"{pid}-1.png", 1), fundus(folder / f"{pid}-2.png", 2)
    out = tmp_path / "p.csv"
    assert score.main([str(tiny_onnx["path"]), str(folder), "-o", str(out), "--pattern",
                       "{id}-{eye:1=right,2=left}.png", "--cache-dir", str(tmp_path / "c"), "--workers", "1"]) == 0
    rows = read_csv(out)
    assert [r["ID"] for r in rows] == ["a", "b"] and all(predictions.is_scored(r["status"]) for r in rows)


@pytest.mark.parametrize("tool, sections", [("score", ["output", "speed", "file names and the cache"]),
                                            ("export", ["output", "check against PyTorch"]),
                                            ("serve", ["network"])])
def test_help_is_in_sections_and_within_110_columns(tool, sections, capsys, monkeypatch):
    import importlib

    monkeypatch.setenv("COLUMNS", "200")  # the help's own limit, not the terminal's
    with pytest.raises(SystemExit) as e:
        importlib.import_module(f"odir_dual.{tool}").main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert max(map(len, text.splitlines())) <= 110
    titles = [line[:-1] for line in text.splitlines() if line.endswith(":") and not line.startswith(" ")]
    assert [t for t in titles if t in sections] == sections, titles

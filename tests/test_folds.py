"""--folds K: the stratified folds, a 2-fold tiny run stopped in fold 2 and resumed there, its fold-ensemble ONNX
graph against the folds' PyTorch models, and odir-compare on two runs' predictions.

The tests on the 2-fold run share one (`fold_run`, about 60 s on a loaded 2-core CPU): they are marked slow."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from odir_dual import compare as compare_script
from odir_dual import export, train
from odir_dual.deploy import compare, runtime
from odir_dual.model.calibration import apply_calibration
from odir_dual.model.metrics import odir_score, paired_bootstrap, roc_auc
from odir_dual.pipeline.constants import CLASSES
from odir_dual.pipeline.sampling import steps_per_epoch
from odir_dual.pipeline.split import load_split, stratified_folds, cross_validation_split, three_way_split
from odir_dual.training import checkpoint, folds, loop
from odir_dual.training.ensemble import ENSEMBLE

TINY = ["--backbone", "test_convnext", "--no-pretrained", "--img-px", "48", "--embed-dim", "32", "--batch-size", "8",
        "--epochs", "2", "--lr", "1e-3", "--warmup-epochs", "0.5", "--loader-threads", "1", "--folds", "2",
        "--eye-loss-weight", "1"]  # with the per-eye head: the ensemble's is fitted on the out-of-fold eyes
EPOCHS, BATCH = 2, 8


def odir_like_labels(n: int, seed: int) -> np.ndarray:
    """(n, 8) 0/1 labels with ODIR's prevalences (N, D common; the rest rare), several labels per patient."""
    prevalence = np.array([0.34, 0.33, 0.05, 0.06, 0.05, 0.03, 0.04, 0.22])
    return (np.random.default_rng(seed).random((n, 8)) < prevalence).astype(np.int64)


# ----------------------------------------------------------------------------------------------- the folds


@pytest.mark.parametrize("n, k, seed", [(300, 5, 0), (301, 3, 7), (41, 2, 42)])
def test_folds_partition_the_non_test_patients_and_keep_prevalences(n, k, seed):
    y = odir_like_labels(n, seed)
    parts, test = cross_validation_split(y, k, 0.15, seed)
    assert np.array_equal(test, three_way_split(y, 0.15, 0.15, seed)[2])  # the same test patients as a plain run
    everything = np.concatenate([*parts, test])
    assert len(everything) == n and set(everything.tolist()) == set(range(n))  # disjoint, and all of them
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    rest = np.sort(np.concatenate(parts))
    worst = max(np.abs(y[p].mean(0) - y[rest].mean(0)).max() for p in parts)
    assert worst <= 1.0 / min(sizes) + 1e-9  # within one patient of the overall prevalence, every class


def test_folds_are_seeded_and_refuse_impossible_counts():
    y = odir_like_labels(60, 1)
    assert all(np.array_equal(a, b) for a, b in zip(stratified_folds(y, 4, 3), stratified_folds(y, 4, 3)))
    with pytest.raises(ValueError, match="folds"):
        stratified_folds(y, 61, 0)


def test_folds_of_the_real_labels_keep_every_prevalence_within_a_quarter_point(odir256):
    from odir_dual.pipeline.odir import label_matrix
    from odir_dual.pipeline.pairs import find_pairs

    table = find_pairs(odir256).table
    y = label_matrix(table[table["status"] == "ok"])
    parts, _ = cross_validation_split(y, 5, 0.15, 42)
    rest = np.concatenate(parts)
    worst = max(np.abs(y[p].mean(0) - y[rest].mean(0)).max() for p in parts)
    assert worst < 0.0025  # measured 0.0023 (MultilabelStratifiedKFold: 0.0059 for this seed)


# ----------------------------------------------------------------------------------------------- a 2-fold run


@pytest.fixture(scope="module")
def fold_run(tmp_path_factory):
    """A 2-fold tiny run, stopped after 1 update, resumed until 1 update into fold 2, then resumed to the end;
    records what the middle state looked like."""
    from odir_dual.pipeline.synthetic import make_synthetic_odir

    tmp = tmp_path_factory.mktemp("folds")
    data = make_synthetic_odir(tmp / "odir", n_patients=48, seed=1, min_px=64, max_px=96, workers=1)
    run_dir = tmp / "k"
    quiet = pytest.MonkeyPatch()
    quiet.setattr(loop, "write_html_report", lambda run_dir: None)  # report.html: not what is tested here (~8 s)
    quiet.setattr(folds, "write_html_report", lambda run_dir: None)
    t0 = time.perf_counter()
    try:
        train.main(["--data", str(data), "--out", str(tmp), "--name", "k", "--cache-dir", str(tmp / "cache"), *TINY,
                    "--stop-after-steps", "1"])
        n_train = len(load_split(run_dir / "fold-1" / "split.csv")[0])
        fold1_updates = steps_per_epoch(n_train, BATCH, 1) * EPOCHS
        # --stop-after-steps counts the updates of all folds: fold 1 ends, fold 2 makes one update
        train.main(["--resume", str(run_dir), "--stop-after-steps", str(fold1_updates + 1)])
        middle = {"fold2_step": torch.load(run_dir / "fold-2" / "last.pt", weights_only=True)["step"],
                  "report": (run_dir / "report.json").exists(),
                  "fold1": {p.name: p.stat().st_mtime_ns for p in (run_dir / "fold-1").iterdir()}}
        train.main(["--resume", str(run_dir)])
    finally:
        quiet.undo()
    return {"dir": run_dir, "data": data, "middle": middle, "fold1_updates": fold1_updates,
            "seconds": time.perf_counter() - t0}


@pytest.mark.slow  # the 2-fold run: ~60 s on a loaded 2-core CPU
def test_a_stopped_fold_run_resumes_at_the_unfinished_fold(fold_run, capsys):
    d, middle = fold_run["dir"], fold_run["middle"]
    assert middle["fold2_step"] == 1 and not middle["report"]  # stopped inside fold 2, no parent report yet
    assert "fold_logits.npz" in middle["fold1"]  # fold 1 had finished
    after = {p.name: p.stat().st_mtime_ns for p in (d / "fold-1").iterdir()}
    assert after == middle["fold1"]  # the last resume did not touch fold 1: not trained again
    assert torch.load(d / "fold-1" / "last.pt", weights_only=True)["step"] == fold_run["fold1_updates"]
    n_train2 = len(load_split(d / "fold-2" / "split.csv")[0])
    assert torch.load(d / "fold-2" / "last.pt", weights_only=True)["step"] == steps_per_epoch(n_train2, BATCH, 1) * 2
    # each fold validated on its held-out part; together the held-out parts are every non-test patient, once
    (tr1, held1, test1), (tr2, held2, test2) = (load_split(d / f"fold-{n}" / "split.csv") for n in (1, 2))
    assert np.array_equal(test1, test2) and not set(held1) & set(held2)
    assert set(tr1) == set(held2) and set(tr2) == set(held1)
    oof = np.loadtxt(d / "predictions_oof.csv", delimiter=",", skiprows=1)
    assert sorted(oof[:, 0].astype(int)) == sorted([*held1, *held2]) and len(held1) + len(held2) + len(test1) == 48
    report = json.loads((d / "report.json").read_text())
    assert report["oof"]["patients"] == len(held1) + len(held2) and report["test"]["patients"] == len(test1)
    f = report["folds"]
    assert f["k"] == 2 and [r["fold"] for r in f["per_fold"]] == [1, 2]
    finals = [r["test"]["final"] for r in f["per_fold"]]
    assert f["mean"]["test"]["final"] == pytest.approx(np.mean(finals))
    assert f["sd"]["test"]["final"] == pytest.approx(np.std(finals, ddof=1))
    held_finals = [r["held_out"]["final"] for r in f["per_fold"]]
    assert f["best_fold"]["fold"] == 1 + int(np.argmax(held_finals))  # chosen on held-out, never on test
    # the ensemble's test figures are those of the mean of the folds' test logits, calibrated on out-of-fold
    logits = [np.load(d / f"fold-{n}" / "fold_logits.npz")["test_logits"] for n in (1, 2)]
    test_csv = np.loadtxt(d / "predictions_test.csv", delimiter=",", skiprows=1)
    probs = apply_calibration(np.mean(logits, 0), report["calibration"])
    np.testing.assert_allclose(test_csv[:, 1 + len(CLASSES):1 + 2 * len(CLASSES)], probs, atol=1e-7)
    assert report["test"]["odir"]["final"] == pytest.approx(odir_score(test_csv[:, 1:9], probs)["final"])
    # the per-eye head too: the folds' mean eye logits, calibrated and thresholded on the out-of-fold eyes
    eye_logits = [np.load(d / f"fold-{n}" / "fold_logits.npz")["test_eye_logits"] for n in (1, 2)]
    header = (d / "predictions_test.csv").read_text().splitlines()[0].split(",")
    left_p = test_csv[:, [header.index(f"left_p_{c}") for c in CLASSES]]
    np.testing.assert_allclose(left_p, apply_calibration(np.mean(eye_logits, 0), report["eye_calibration"])[:, 0],
                               atol=1e-7)
    assert report["eye_fit_eyes"] > 0 and "model" in report["test"]["eyes"] and "eyes" in report["oof"]
    assert fold_run["seconds"] < 600


# ----------------------------------------------------------------------------------------------- export


@pytest.mark.slow  # the 2-fold run: ~60 s on a loaded 2-core CPU
def test_fold_ensemble_onnx_is_the_mean_of_the_folds_calibrated(fold_run):
    d = fold_run["dir"]
    result = export.export(d, d / "ensemble.onnx", exporter="torchscript", log=lambda *a: None)
    session, meta, _ = runtime.load_session(result["path"], "cpu")  # what score.py and serve.py open
    report = json.loads((d / "report.json").read_text())
    assert meta["raw"]["folds"] == "2" and meta["raw"]["checkpoint"] == ENSEMBLE
    np.testing.assert_allclose(meta["thresholds"], list(report["thresholds"].values()))
    assert json.loads(meta["raw"]["calibration"]) == report["calibration"]
    nets = [checkpoint.model_from_checkpoint(checkpoint.read_checkpoint(d / f"fold-{n}" / "best.pt")) for n in (1, 2)]
    g = torch.Generator().manual_seed(5)
    left, right = (torch.randn(3, 3, 48, 48, generator=g) for _ in range(2))
    with torch.no_grad():
        mean_logits = torch.stack([net(left, right) for net in nets]).mean(0).numpy()
        mean_eyes = torch.stack([net(left, right, eye_logits=True)[1] for net in nets]).mean(0).numpy()
    probs, logits, eye_probs = session.run(["probs", "logits", "eye_probs"],
                                           {"left": left.numpy(), "right": right.numpy()})
    np.testing.assert_allclose(logits, mean_logits, atol=1e-4)
    np.testing.assert_allclose(probs, apply_calibration(mean_logits, report["calibration"]), atol=1e-4)
    # the per-eye head: the folds' mean eye logits with the calibration fitted on the out-of-fold eyes
    np.testing.assert_allclose(eye_probs, apply_calibration(mean_eyes, report["eye_calibration"]), atol=1e-4)
    np.testing.assert_allclose(json.loads(meta["raw"]["eye_thresholds"]), list(report["eye_thresholds"].values()))
    assert "mean of the logits of 2 fold models" in (d / "MODEL_CARD.md").read_text()
    with pytest.raises(checkpoint.CheckpointError, match="--fold 3"):
        export.export(d, fold=3, log=lambda *a: None)


@pytest.mark.slow  # the 2-fold run
def test_serve_explains_the_fold_ensemble_with_its_out_of_fold_calibration(fold_run):
    """serve.py RUN and score.py --explain RUN on a --folds run (the cpu preset's default) explain the model that
    export.py writes: the folds' mean logits, calibrated and thresholded as fitted on the out-of-fold predictions."""
    from odir_dual import serve
    from odir_dual.deploy.report import Explainer, model_input, network_view

    d = fold_run["dir"]
    report = json.loads((d / "report.json").read_text())
    explainer = Explainer(d)
    left = sorted((fold_run["data"] / "Training Images").glob("*_left.jpg"))[:2]
    right = [p.with_name(p.name.replace("_left", "_right")) for p in left]
    items = explainer.explain(left, right, [[0], [3]])
    nets = [checkpoint.model_from_checkpoint(checkpoint.read_checkpoint(d / f"fold-{n}" / "best.pt")) for n in (1, 2)]
    views = [model_input([network_view(p, explainer.img_px) for p in eye], explainer.mean, explainer.std)
             for eye in (left, right)]
    with torch.no_grad():
        mean_logits = torch.stack([net(*views) for net in nets]).mean(0).numpy()
    np.testing.assert_allclose([it["probs"] for it in items], apply_calibration(mean_logits, report["calibration"]),
                               atol=1e-5)
    assert explainer.thresholds == pytest.approx(list(report["thresholds"].values()))
    assert explainer.eye_thresholds == pytest.approx(list(report["eye_thresholds"].values()))
    assert items[1]["cams"][3][0].shape == (explainer.img_px, explainer.img_px)
    identity = serve.model_identity(d, explainer)
    assert "the mean of 2 fold models" in identity["patients"] and identity["quality"]
    assert "calibrated on the run's out-of-fold predictions" in serve.identity_html(identity)


# ----------------------------------------------------------------------------------------------- compare


@pytest.mark.slow  # the 2-fold run: ~60 s on a loaded 2-core CPU
def test_compare_two_runs_on_the_same_test_patients(fold_run, capsys):
    d = fold_run["dir"]
    a, b = compare.read_predictions(d), compare.read_predictions(d / "fold-1")  # ensemble vs fold 1, test
    result = compare.compare(a, b, resamples=200, seed=3)
    for name, predictions in (("a", a), ("b", b)):
        assert result["final"][name] == pytest.approx(odir_score(predictions.labels, predictions.probs)["final"])
    r = result["final"]
    assert r["difference"] == pytest.approx(r["b"] - r["a"]) and r["ci95"][0] <= r["difference"] <= r["ci95"][1]
    assert compare_script.main([str(d), str(d / "fold-1"), "--resamples", "200"]) == 0
    out = capsys.readouterr().out
    assert f"{len(a.ids)} patients" in out and "official final" in out and "AUC D diabetes" in out
    # out-of-fold: the same run against itself differs by exactly 0, an interval that does not exclude it
    same = compare.compare(*(compare.read_predictions(d, oof=True) for _ in range(2)), resamples=200)
    assert same["auc_macro"]["ci95"] == [0.0, 0.0] and not same["auc_macro"]["excludes_zero"]


@pytest.mark.slow  # the 2-fold run: ~60 s on a loaded 2-core CPU
def test_compare_refuses_runs_with_other_patients(fold_run, capsys):
    d = fold_run["dir"]
    held = [d / f"fold-{n}" / "predictions_val.csv" for n in (1, 2)]  # two runs' validation: disjoint patients
    with pytest.raises(compare.CompareError, match="not the same patients"):
        compare.compare(*(compare.read_predictions(p) for p in held))
    assert compare_script.main([str(p) for p in held]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("compare.py: error: ") and "not the same patients" in err and "\n" not in err


def test_paired_bootstrap_finds_a_real_difference_and_reads_score_py_csvs(tmp_path):
    y = odir_like_labels(200, 4)
    noise = np.random.default_rng(0).random(y.shape)
    weak, strong = 0.2 * y + 0.8 * noise, 0.6 * y + 0.4 * noise
    r = paired_bootstrap(y, weak, strong, resamples=300, seed=1)
    assert r["auc_macro"]["excludes_zero"] and r["auc_macro"]["ci95"][0] > 0
    assert r["auc_D"]["a"] == pytest.approx(roc_auc(y[:, 1], weak[:, 1]))
    # score.py's output on a labelled folder: ID, p_*, true_labels; an unscored patient (no probabilities) dropped
    rows = ["ID," + ",".join(f"p_{c}" for c in CLASSES) + ",true_labels,status"]
    rows += [f"{i}," + ",".join(f"{v:.4f}" for v in strong[i]) + ',"' + ",".join(
        c for c, on in zip(CLASSES, y[i]) if on) + '",ok' for i in range(200)]
    rows.append("999," + "," * (len(CLASSES) - 1) + ",,missing right eye")
    (tmp_path / "scored.csv").write_text("\n".join(rows) + "\n")
    read = compare.read_predictions(tmp_path / "scored.csv")
    assert len(read.ids) == 200 and np.array_equal(read.labels, y[np.argsort([str(i) for i in range(200)])])


def test_compare_refuses_other_patients_in_one_line(tmp_path, capsys):
    header = "id," + ",".join(CLASSES) + "," + ",".join(f"p_{c}" for c in CLASSES)
    for run, ids in (("a", (1, 2, 3)), ("b", (1, 2, 4))):  # two run folders' predictions_test.csv
        (tmp_path / run).mkdir()
        rows = [f"{i}," + ",".join(["1"] + ["0"] * 7) + "," + ",".join(["0.5"] * 8) for i in ids]
        (tmp_path / run / "predictions_test.csv").write_text("\n".join([header, *rows]) + "\n")
    assert compare_script.main([str(tmp_path / "a"), str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("compare.py: error: ") and "\n" not in err
    assert "not the same patients" in err and "only in the first: 3" in err and "only in the second: 4" in err
    assert compare_script.main([str(tmp_path / "a"), str(tmp_path / "b"), "--oof"]) == 1
    assert "predictions_oof.csv: no such file" in capsys.readouterr().err


def test_recipe_table_reads_out_of_fold_predictions_and_undoes_the_offset(tmp_path):
    """benchmarks/recipe_table.py: each run's out-of-fold figures, its paired difference to the first run, and with
    --offset-off the same predictions before the ODIR offset (exactly: the offset undone on the logits)."""
    from benchmarks import recipe_table
    y = odir_like_labels(240, 5)
    noise = np.random.default_rng(1).random(y.shape)
    header = "id," + ",".join(CLASSES) + "," + ",".join(f"p_{c}" for c in CLASSES)
    for run, probs, offset in (("weak", 0.2 * y + 0.8 * noise, 0.5), ("strong", 0.6 * y + 0.4 * noise, -0.3)):
        (tmp_path / run).mkdir()
        rows = [f"{i}," + ",".join(map(str, y[i])) + "," + ",".join(f"{v:.6f}" for v in probs[i]) for i in range(240)]
        (tmp_path / run / "predictions_oof.csv").write_text("\n".join([header, *rows]) + "\n")
        (tmp_path / run / "report.json").write_text(json.dumps({"calibration": {"odir_offset": offset}}))
    rows = recipe_table.rows_of([tmp_path / "weak", tmp_path / "strong"], offset_off=True)
    assert [label for label, _ in rows] == ["weak", "weak, ODIR offset off", "strong", "strong, ODIR offset off"]
    p, off = rows[0][1].probs, rows[1][1].probs
    np.testing.assert_allclose(np.log(p / (1 - p)) - np.log(off / (1 - off)), 0.5, atol=1e-3)
    text = recipe_table.table(rows, resamples=200)
    strong_row = next(line for line in text.splitlines() if line.startswith("| strong |"))
    assert "*)" in strong_row.split("|")[5], text  # the AUC macro gain over the weak reference excludes 0
    assert text.count("\n| ") == 4  # the 4 rows under the header and its |---| line

"""The whole user path on held-out patients: train → report.json's test figures; export → ONNX; score.py on a folder
of exactly those test patients → the same probabilities and the same official score. The model has the per-eye head
(as the cpu preset's), so its per-eye probabilities and figures go the same way."""
import json

import numpy as np
import pytest

from odir_dual import export
from odir_dual import score
from odir_dual.deploy import predictions
from odir_dual import train
from odir_dual.model import odir_score
from odir_dual.pipeline.constants import CLASSES
from odir_dual.pipeline.odir import subset_folder
from odir_dual.pipeline.split import load_split


@pytest.fixture(scope="module")
def small_odir(tmp_path_factory):
    from odir_dual.pipeline.synthetic import make_synthetic_odir

    return make_synthetic_odir(tmp_path_factory.mktemp("odir"), n_patients=80, seed=2, min_px=64, max_px=96,
                               workers=1)


def test_scored_holdout_folder_matches_the_runs_test_report(tmp_path, small_odir):
    cache = tmp_path / "cache"
    train.main(["--data", str(small_odir), "--out", str(tmp_path), "--name", "run", "--cache-dir", str(cache),
                "--backbone", "test_resnet", "--no-pretrained", "--img-px", "48", "--embed-dim", "32",
                "--batch-size", "8", "--epochs", "2", "--lr", "2e-3", "--loader-threads", "1",
                "--eye-loss-weight", "1", "--folds", "0"])
    run = tmp_path / "run"
    report = json.loads((run / "report.json").read_text())["test"]
    onnx_path = export.export(run, log=lambda *a: None)["path"]
    _, _, test_ids = load_split(run / "split.csv")
    folder = subset_folder(small_odir, test_ids, tmp_path / "holdout")

    result = score.score_folder(onnx_path, folder, out=tmp_path / "p.csv", cache_dir=cache, progress=False,
                                workers=1, log=lambda *a: None)
    scored = result["frame"]
    assert scored["ID"].astype(int).tolist() == sorted(test_ids.tolist())
    assert scored["status"].map(predictions.is_scored).all()
    probs = scored[[f"p_{c}" for c in CLASSES]].to_numpy(dtype=float)
    y = result["table"][list(CLASSES)].to_numpy(dtype=int)
    # id, N..O, p_N..p_O, left_p_N..left_p_O, right_p_N..right_p_O
    expected = np.loadtxt(run / "predictions_test.csv", delimiter=",", skiprows=1)
    expected = expected[np.argsort(expected[:, 0])]
    np.testing.assert_array_equal(y, expected[:, 1:9])
    np.testing.assert_allclose(probs, expected[:, 9:17], atol=1e-4)  # ONNX fp32 on the CPU vs PyTorch
    eye_columns = [f"{e}_p_{c}" for e in ("left", "right") for c in CLASSES]
    np.testing.assert_allclose(scored[eye_columns].to_numpy(dtype=float), expected[:, 17:], atol=1e-4)
    eye_thr = json.loads((run / "report.json").read_text())["eye_thresholds"]
    assert result["meta"]["eye_thresholds"].tolist() == [eye_thr[c] for c in CLASSES]
    o = odir_score(y, probs)
    for k in ("kappa", "f1", "auc", "final"):
        assert round(o[k], 3) == round(report["odir"][k], 3), k

"""train.py end to end on a tiny synthetic ODIR set: run folder, checkpoints, resume, NaN stop, DDP, compile."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from odir_dual.common.cli import UsageError
from odir_dual.model import factory
from odir_dual.training import checkpoint
from odir_dual.training import config
from odir_dual.training import engine
from odir_dual import train
from odir_dual.pipeline.constants import CLASSES

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--backbone", "test_convnext", "--no-pretrained", "--img-px", "48", "--embed-dim", "32",
        "--batch-size", "8", "--epochs", "2", "--lr", "1e-3", "--warmup-epochs", "0.5", "--loader-threads", "1",
        "--folds", "0"]  # one run (the cpu preset, auto's choice here, cross-validates)


@pytest.fixture(scope="module")
def tiny_odir(tmp_path_factory):
    from odir_dual.pipeline.synthetic import make_synthetic_odir

    return make_synthetic_odir(tmp_path_factory.mktemp("odir"), n_patients=48, seed=1, min_px=64, max_px=96,
                               workers=1)


def run(tmp_path, tiny_odir, *extra, name="run"):
    args = ["--data", str(tiny_odir), "--out", str(tmp_path), "--name", name,
            "--cache-dir", str(tmp_path / "cache"), *TINY, *extra]
    return train.main(args)


def test_seed_preset_is_the_seed_recipe():
    cfg = config.resolve_config({"preset": "seed"})
    assert (cfg.backbone, cfg.img_px, cfg.batch_size, cfg.accum_steps, cfg.epochs) == ("convnext_small", 384, 6, 2, 25)
    assert (cfg.lr, cfg.backbone_lr_mult, cfg.weight_decay, cfg.warmup_epochs) == (5e-5, 0.1, 2e-5, 3.0)
    assert cfg.clip_grad == 1.0 and cfg.weighted_sampling and cfg.pretrained and cfg.patience > 0
    assert cfg.precision == "auto" and not cfg.compile  # AMP on a GPU; the seed ran eager


def test_flags_come_from_config_fields_and_override_presets():
    cfg = config.parse_config(["--preset", "fast", "--no-compile", "--batch-size", "7", "--precision", "fp32"])
    assert (cfg.preset, cfg.compile, cfg.batch_size, cfg.precision) == ("fast", False, 7, "fp32")
    assert cfg.img_px == 384  # from the preset
    with pytest.raises(UsageError, match="--preset"):  # not one of the flag's choices
        config.parse_config(["--preset", "nope"])


def test_real_data_on_a_cpu_gets_the_cpu_preset_and_the_demo_stays_synthetic():
    assert config.parse_config(["--data", "/some/odir"]).preset == "cpu"
    cfg = config.parse_config(["--data", "/some/odir"])
    assert (cfg.backbone, cfg.pretrained, cfg.weighted_sampling, cfg.select_metric, cfg.calibration) == (
        "tf_efficientnet_lite0", True, False, "auc_macro", "platt")  # ImageNet weights from an installed package
    assert (cfg.val_fraction, cfg.test_fraction) == (0.15, 0.15)


def test_no_arguments_is_the_demo_on_a_cpu():
    if torch.cuda.is_available():
        pytest.skip("the default preset is fast on a GPU")
    assert config.parse_config([]).preset == "demo"


def test_schedule_warms_up_then_decays_to_zero():
    f = [engine.lr_factor(s, 100, 10) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert f[-1] < 0.01


def test_run_folder_and_checkpoint(tmp_path, tiny_odir):
    run(tmp_path, tiny_odir)
    d = tmp_path / "run"
    for name in ("config.json", "split.csv", "left_out.csv", "metrics.csv", "curves.png", "best.pt", "last.pt"):
        assert (d / name).is_file(), name
    best = torch.load(d / "best.pt", weights_only=True)  # data only, no pickled code
    assert best["classes"] == list(CLASSES) and len(best["thresholds"]) == 8
    assert best["config"]["backbone"] == "test_convnext" and best["img_px"] == 48
    assert {"torch", "timm"} <= set(best["versions"]) and best["commit"]
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in best["model"])
    assert "odir" in best["val_metrics"] and "tuned" in best["val_metrics"]
    rows = (d / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3 and "val_odir" in rows[0]
    model = factory.build_model(config.config_from_dict(best["config"]), pretrained=False)
    model.load_state_dict(best["model"])


def test_final_report_is_on_unseen_test_patients_and_matches_the_console(tmp_path, tiny_odir, capsys):
    from odir_dual.model.metrics import format_interval
    from odir_dual.pipeline.split import load_split

    run(tmp_path, tiny_odir, "--model-ema", "--model-ema-decay", "0.5")
    out = capsys.readouterr().out
    d = tmp_path / "run"
    train_ids, val_ids, test_ids = load_split(d / "split.csv")
    assert len(test_ids) == round(48 * 0.15) and not set(test_ids) & (set(train_ids) | set(val_ids))
    report = json.loads((d / "report.json").read_text())
    assert report["data"] == {"folder": str(tiny_odir), "validation": len(val_ids), "test": len(test_ids)}
    best = torch.load(d / "best.pt", weights_only=True)
    assert report["calibration"] == best["calibration"] and report["calibration"]["method"] == "platt"
    predictions = (d / "predictions_test.csv").read_text().splitlines()
    assert predictions[0].split(",") == ["id", *CLASSES, *(f"p_{c}" for c in CLASSES),  # the cpu preset's eye head:
                                         *(f"{e}_p_{c}" for e in ("left", "right") for c in CLASSES)]
    assert report["test"]["eyes"]["eyes"] == 2 * len(test_ids) and "  per eye (test: " in out
    assert sorted(int(r.split(",")[0]) for r in predictions[1:]) == sorted(test_ids.tolist())
    for split in ("validation", "test"):  # every figure the console shows is the one report.json holds
        r = report[split]
        assert f"{split} ({r['patients']} patients)" in out
        o, t, ci = r["odir"], r["trivial"]["odir"], r["ci95"]
        assert ci["resamples"] == 1000 and ci["seed"] == 42  # the run's seed: the same run, the same intervals

        def cells(m, bounds, keys):  # the console's cells: the figure and its interval, 19 wide
            return "  ".join(f"{format_interval(m[k], bounds[k] if bounds else None):<19}" for k in keys)

        assert ("  model" + " " * 19 + "  " + cells(o, ci["odir"], ("kappa", "f1", "auc", "final")).rstrip()) in out
        assert ("  trivial" + " " * 17 + "  " + cells(t, None, ("kappa", "f1", "auc")) + "  "
                + format_interval(t["final"], ci["baseline"]["final"])) in out
        lo, hi = ci["baseline"]["final_difference"]
        assert f"official final, model − trivial: {o['final'] - t['final']:+.3f} [{lo:+.2f}, {hi:+.2f}]" in out
        e = r["calibration_error"]
        assert f"ECE {e['ece_before']:.3f} → {e['ece_after']:.3f}" in out
        m = r["tuned"]
        assert ("  model, tuned thresholds  " + " " + cells(m, ci["tuned"], ("f1_micro", "f1_macro", "auc_macro"))
                .rstrip()) in out
        assert r["per_class"]["positives"]["D"] == int(r["per_class"]["prevalence"]["D"] * r["patients"] + 0.5)
        assert (f"  D diabetes     {r['per_class']['positives']['D']:>9}  "
                f"{format_interval(m['f1']['D'], ci['tuned']['f1']['D']):<19}") in out
    assert report["counts"] == {"train": len(train_ids), "validation": len(val_ids), "test": len(test_ids)}
    assert report["started"] <= report["finished"] and 0 < report["duration_s"] < 600
    assert 0 <= report["bootstrap_s"] < 30
    rows = (d / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,step,train_loss,val_loss,") and rows[0].endswith(",train_patient_loss")


def test_per_eye_loss_trains_the_eye_head_from_the_sheets_keywords(tmp_path, tiny_odir, capsys):
    """Each member of an ensemble gets its own per-eye head, and the per-eye loss adds to the patient loss."""
    import pandas as pd

    run(tmp_path, tiny_odir, "--eye-loss-weight", "1", "--epochs", "1", "--ensemble", "2", name="eyes")
    n_train = (pd.read_csv(tmp_path / "eyes" / "split.csv")["split"] == "train").sum()
    out = capsys.readouterr().out
    assert f"per-eye loss: {n_train} of {n_train} training patients" in out and "ensemble of 2" in out
    last = torch.load(tmp_path / "eyes" / "last.pt", weights_only=True)
    assert {f"members.{m}.eye_head.{p}" for m in (0, 1) for p in ("weight", "bias")} <= set(last["model"])
    run(tmp_path, tiny_odir, "--epochs", "1", "--eye-loss-weight", "0", name="plain")  # the cpu preset has it on
    losses = [pd.read_csv(tmp_path / n / "metrics.csv")["train_loss"][0] for n in ("eyes", "plain")]
    assert losses[0] > losses[1] * 1.2  # the per-eye BCE (~0.7 at the start) is added to the same patient loss


def test_resume_equals_uninterrupted(tmp_path, tiny_odir, capsys):
    run(tmp_path, tiny_odir, "--model-ema", name="straight")
    run(tmp_path, tiny_odir, "--model-ema", "--stop-after-steps", "6", name="split")  # 4 updates/epoch: mid-epoch 2
    part = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    assert part["step"] == 6
    # the report of a stopped run says so (console, report.json, report.html)
    report = json.loads((tmp_path / "split" / "report.json").read_text())
    assert report["epochs"] == {"reached": 2, "of": 2, "stopped_by": "--stop-after-steps"}
    assert "epochs: stopped at epoch 2 of 2 (--stop-after-steps); best epoch 1" in capsys.readouterr().out
    assert "stopped at epoch 2 of 2" in (tmp_path / "split" / "report.html").read_text()
    train.main(["--resume", str(tmp_path / "split")])
    assert "at update 6: epoch 2 of 2" in capsys.readouterr().out  # epochs counted from 1, as on the console
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 8
    for weights in ("model", "model_ema"):  # the moving average resumes exactly too
        for k in a[weights]:
            assert torch.equal(a[weights][k], b[weights][k]), (weights, k)
    assert (tmp_path / "split" / "metrics.csv").read_text().count("\n") == 3
    assert json.loads((tmp_path / "split" / "report.json").read_text())["epochs"]["stopped_by"] is None


def test_resume_of_a_finished_run_says_so_and_touches_nothing(tmp_path, tiny_odir, capsys):
    run(tmp_path, tiny_odir, "--epochs", "1", name="done")
    folder = tmp_path / "done"
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    capsys.readouterr()
    assert train.cli(["--resume", str(folder)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("finished: 1 of 1 epochs; extend with ") and \
        out[0].endswith(f"--resume {folder} --epochs N"), out
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before  # nothing written, nothing added
    train.main(["--resume", str(folder), "--epochs", "2"])  # a larger --epochs does resume
    assert torch.load(folder / "last.pt", weights_only=True)["epochs_done"] == 2


def test_a_signal_on_an_epochs_last_update_leaves_its_validation_to_resume(tmp_path, tiny_odir, monkeypatch, capsys):
    """Ctrl-C on the last update of epoch 1 skips that epoch's validation; --resume validates it first, so the epoch
    still counts (metrics.csv row, best.pt) and the run is not taken as finished."""
    from odir_dual.training import loop

    real = loop.train_epoch

    def signal_at_the_end(run_, *args, **kwargs):  # as if SIGINT arrived during the epoch's last update
        row = real(run_, *args, **kwargs)
        run_.stop.requested, run_.stop.signum = True, signal.SIGINT
        return row

    monkeypatch.setattr(loop, "train_epoch", signal_at_the_end)
    assert run(tmp_path, tiny_odir, "--epochs", "1", name="edge") == train.EXIT_SIGINT
    last = torch.load(tmp_path / "edge" / "last.pt", weights_only=True)
    assert last["epochs_done"] == 1 and last["unvalidated_row"]["epoch"] == 1
    assert not (tmp_path / "edge" / "best.pt").exists() and not (tmp_path / "edge" / "report.json").exists()
    monkeypatch.setattr(loop, "train_epoch", real)
    capsys.readouterr()
    train.main(["--resume", str(tmp_path / "edge")])  # not "finished": the validation is still owed
    assert "finished:" not in capsys.readouterr().out
    assert torch.load(tmp_path / "edge" / "best.pt", weights_only=True)["epoch"] == 1
    assert (tmp_path / "edge" / "metrics.csv").read_text().count("\n") == 2  # header + epoch 1
    assert torch.load(tmp_path / "edge" / "last.pt", weights_only=True)["unvalidated_row"] is None
    assert (tmp_path / "edge" / "report.json").is_file()


def test_nan_loss_stops_with_epoch_and_step(tmp_path, tiny_odir, monkeypatch):
    from odir_dual.model import loss as model_loss

    real = model_loss.hybrid_loss
    calls = {"n": 0}

    def poisoned(logits, targets, pos_weight, **kw):
        calls["n"] += logits.requires_grad  # training steps only, not the validation loss
        loss = real(logits, targets, pos_weight, **kw)
        return loss * float("nan") if calls["n"] == 7 and logits.requires_grad else loss

    monkeypatch.setattr(model_loss, "hybrid_loss", poisoned)
    from odir_dual.training.loop import LossNotFinite

    with pytest.raises(LossNotFinite, match=r"epoch 2, update 7"):
        run(tmp_path, tiny_odir)
    assert torch.load(tmp_path / "run" / "best.pt", weights_only=True)["epoch"] == 1  # the good one is kept


def test_ctrl_c_writes_last_pt_and_resume_finishes(tmp_path, tiny_odir):
    cmd = [sys.executable, str(ROOT / "train.py"), "--data", str(tiny_odir), "--out", str(tmp_path), "--name", "int",
           "--cache-dir", str(tmp_path / "cache"), *TINY, "--epochs", "200"]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "int" / "last.pt").exists() and time.time() < deadline:
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 130, out[-2000:]  # 128 + SIGINT: stopped, resumable (docs/data.md, "Exit statuses")
    assert "SIGINT: stopping after this update" in out
    # one line says how to go on, with the interpreter that ran; no evaluation, no report
    said = out[out.index("SIGINT (Ctrl-C): stopped in epoch "):].split()  # (the command on its own line if long)
    python = Path(os.path.abspath(sys.executable))  # as the user typed it from the working directory (ROOT here)
    python = python.relative_to(ROOT) if python.is_relative_to(ROOT) else python
    assert " ".join(said).endswith(f"resume: {python} train.py --resume {tmp_path / 'int'}"), said
    assert out.count("--resume") == 1  # every line within 110 columns, but a long path in the command (copyable)
    assert [line for line in out.splitlines() if len(line) > 110 and "--resume" not in line] == []
    assert not (tmp_path / "int" / "report.json").exists() and "official ODIR" not in out
    stopped = torch.load(tmp_path / "int" / "last.pt", weights_only=True)["step"]
    assert 5 <= stopped < 1000
    train.main(["--resume", str(tmp_path / "int"), "--stop-after-steps", str(stopped + 3)])
    assert torch.load(tmp_path / "int" / "last.pt", weights_only=True)["step"] == stopped + 3


KILLER = """
import sys, torch, checkpoint
path = sys.argv[1]
big = {"w": torch.randn(4_000_000)}
while True:
    checkpoint.save_checkpoint(big, path)
"""


def test_kill_during_checkpointing_leaves_a_loadable_file(tmp_path):
    path = tmp_path / "best.pt"
    checkpoint.save_checkpoint({"w": torch.zeros(3)}, path)
    for delay in (0.3, 0.7, 1.1, 1.6):
        p = subprocess.Popen([sys.executable, "-c", KILLER, str(path)], cwd=ROOT)
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        ckpt = torch.load(path, weights_only=True)
        assert ckpt["w"].numel() in (3, 4_000_000)


@pytest.mark.slow
def test_ddp_two_processes(tmp_path, tiny_odir):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
           str(ROOT / "train.py"), "--data", str(tiny_odir), "--out", str(tmp_path), "--name", "ddp",
           "--cache-dir", str(tmp_path / "cache"), *TINY, "--batch-size", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "× 2 rank(s)" in out.stdout
    assert "replicas identical across 2 ranks: yes" in out.stdout
    assert (tmp_path / "ddp" / "best.pt").is_file()
    # 34 training patients (70 % of 48) / 2 ranks / batch 4 = 4 steps per rank per epoch, 8 pairs per update
    assert "4 updates/epoch of 8 pairs" in out.stdout


@pytest.mark.slow
def test_compiled_training_step_on_cpu(tmp_path, tiny_odir):
    run(tmp_path, tiny_odir, "--compile", "--stop-after-steps", "2", "--epochs", "1")
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert last["step"] == 2 and last["config"]["compile"]
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


def test_dry_run_on_real_data_reports_the_24_one_eyed_patients(odir256, tmp_path, capsys):
    train.main(["--data", str(odir256), "--dry-run", "--cache-dir", str(tmp_path / "cache")])
    out = capsys.readouterr().out
    assert "left out 24 patient(s): 24 missing file" in out
    assert "usable patients: 2215" in out
    # the default (cpu preset) cross-validates: every non-test patient trains 2 of the 3 folds' models
    assert "split (seed 42): 3 folds of the 1883 patients outside the test split, held out 628 / 628 / 627" in out
    assert "test 332" in out
    train.main(["--data", str(odir256), "--dry-run", "--folds", "0", "--cache-dir", str(tmp_path / "cache")])
    assert "split (seed 42): train 1551 · validation 332 · test 332" in capsys.readouterr().out


def test_bf16_autocast_run(tmp_path, tiny_odir):
    """The fast preset's precision: images arrive as bf16 (DALI emits fp16; the loader casts) under bf16 autocast."""
    run(tmp_path, tiny_odir, "--precision", "bf16", "--stop-after-steps", "2", "--epochs", "1")
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert last["step"] == 2
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


def test_main_gives_back_the_callers_signal_handlers(tmp_path, tiny_odir):
    before = signal.getsignal(signal.SIGINT)
    run(tmp_path, tiny_odir, "--stop-after-steps", "1", "--epochs", "1")
    assert signal.getsignal(signal.SIGINT) is before

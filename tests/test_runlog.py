"""train.log (the console, without progress-bar noise) and --tensorboard, without training."""
from __future__ import annotations

import sys

import pytest

from odir_dual.training import runlog


def test_console_log_writes_what_a_terminal_would_show(tmp_path, capsys):
    with runlog.console_log():
        print("before the run folder exists")
        sys.stderr.write("epoch 1:  10%\repoch 1:  50%\r\x1b[A\repoch 1: 100%\r          \r")  # a bar, then cleared
        runlog.log_console_to(tmp_path / "train.log")
        print("after", end="")
        print(" it")
        sys.stderr.write("a warning\n")
        print("unterminated last line", end="")
    assert (tmp_path / "train.log").read_text() == ("before the run folder exists\nafter it\na warning\n"
                                                    "unterminated last line\n")
    out, err = capsys.readouterr()
    assert out.startswith("before the run folder exists") and "\r" in err  # the console itself is untouched
    assert not isinstance(sys.stdout, runlog._Tee)  # streams restored


def test_console_log_appends_on_resume_and_is_off_for_other_ranks(tmp_path):
    log = tmp_path / "train.log"
    log.write_text("first run\n")
    with runlog.console_log():
        runlog.log_console_to(log)
        print("resumed")
    with runlog.console_log(enabled=False):
        runlog.log_console_to(log)  # no active log: nothing happens
        print("rank 1")
    assert log.read_text() == "first run\nresumed\n"


def _row(epoch: int) -> dict:
    return {"epoch": epoch, "step": 4 * epoch, "train_loss": 0.7 / epoch, "val_loss": 0.8, "train_f1_macro": 0.1,
            "val_f1_micro": 0.2, "val_f1_macro": 0.3, "val_odir": 0.4, "lr": 1e-3, "pairs_per_s": 12.5}


def test_tensorboard_scalars_when_installed(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = runlog.RunLog(tmp_path, tensorboard=True)
    log.append(_row(1)), log.append(_row(2))
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert {"train_loss", "val_f1_macro", "lr", "pairs_per_s"} <= set(events.Tags()["scalars"])
    assert [(e.step, round(e.value, 4)) for e in events.Scalars("train_loss")] == [(1, 0.7), (2, 0.35)]


def test_tensorboard_missing_is_one_clear_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    log = runlog.RunLog(tmp_path, tensorboard=True)
    assert "--tensorboard: the tensorboard package is not installed (pip install tensorboard)" in capsys.readouterr().out
    log.append(_row(1))  # training goes on; the numbers are in metrics.csv
    assert (tmp_path / "metrics.csv").is_file() and not (tmp_path / "tensorboard").exists()


def _rows(select_values, eye_term=0.1) -> list[dict]:
    """metrics.csv rows as RunLog.history() returns them (strings), one per epoch."""
    return [{"epoch": str(e), "train_loss": f"{0.9 / e + eye_term}", "train_patient_loss": f"{0.9 / e}",
             "val_loss": f"{1.0 / e}", "train_f1_macro": "0.3", "val_f1_macro": "0.3", "val_f1_micro": "0.4",
             "val_odir": "0.5", "val_auc_macro": f"{v}"} for e, v in enumerate(select_values, start=1)]


def test_best_epoch_is_the_first_best_of_the_selection_metric():
    rows = _rows([0.6, 0.7, 0.7, 0.65])
    assert runlog.best_epoch(rows, "auc_macro") == 2  # ties: the first, as train.py keeps the first best.pt
    assert runlog.best_epoch(rows, "loss") == 4  # the lowest validation loss
    assert runlog.best_epoch(rows, None) is None


def test_curves_have_integer_epochs_the_selection_metric_and_like_for_like_losses(tmp_path):
    rows = _rows([0.6, 0.72, 0.7, 0.65, 0.61, 0.6, 0.6])  # 7 epochs: matplotlib would put ticks at 0.5 steps
    fig = runlog.curves_figure(rows, "auc_macro")
    loss, select, _ = fig.axes
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks)
        assert any(list(line.get_xdata()) == [2, 2] for line in ax.get_lines())  # the best epoch's dotted line
    labels = [line.get_label() for line in loss.get_lines()]
    assert "train (patient loss)" in labels and "validation" in labels and "train, with the per-eye term" in labels
    patient = next(line for line in loss.get_lines() if line.get_label() == "train (patient loss)")
    assert list(patient.get_ydata()) == [0.9 / e for e in range(1, 8)]  # not the total with the per-eye term
    assert "auc macro" in select.get_title()
    assert any(line.get_label() == "best: epoch 2, 0.720" for line in select.get_lines())
    import matplotlib.pyplot as plt

    plt.close(fig)
    runlog.plot_curves(rows, tmp_path / "curves.png", "auc_macro")
    from PIL import Image

    assert Image.open(tmp_path / "curves.png").size[0] >= 2000  # 14 in at 150 dpi
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]  # written through a temporary file, renamed


def test_curves_of_an_older_run_without_the_new_columns(tmp_path):
    rows = [{k: v for k, v in r.items() if k not in ("train_patient_loss", "val_auc_macro")} for r in _rows([0.5] * 2)]
    fig = runlog.curves_figure(rows, "auc_macro")
    assert [line.get_label() for line in fig.axes[0].get_lines()][:2] == ["train", "validation"]
    assert "not recorded" in fig.axes[1].get_title()


@pytest.mark.parametrize("preset", ["cpu", "seed"])
def test_epoch_row_fits_110_columns_and_marks_the_best(preset, capsys):
    from odir_dual.training import config

    cfg = config.resolve_config({"preset": preset})
    row = {"epoch": cfg.epochs, "step": 99999, "train_loss": 12.3456, "val_loss": 10.5, "train_f1_macro": 0.5,
           "val_f1_micro": 0.5, "val_f1_macro": 0.512, "val_odir": 0.655, "val_auc_macro": 0.75, "lr": 5e-5,
           "pairs_per_s": 12345.6, "data_s": 1.0, "data_pct": 100.0, "epoch_s": 99999.9, "val_s": 3.0,
           **{f"f1_{c}": 0.5 for c in "NDGCAHMO"}}
    runlog.print_epoch(row, header=True, epochs=cfg.epochs, select_metric=cfg.select_metric, best=True)
    runlog.print_epoch({**row, "epoch": 1}, header=False, epochs=cfg.epochs, select_metric=cfg.select_metric)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and max(map(len, lines)) <= 110, [len(line) for line in lines]
    title = {"auc_macro": "AUC macro", "f1_macro": "F1 macro"}[cfg.select_metric]
    assert f"new best validation {title} (--select-metric) → best.pt" in lines[0]
    for column in ("train loss", "val loss", title, "F1 macro", "ODIR", "lr", "sec"):
        assert column in lines[1]
    assert lines[2].lstrip().startswith(f"{cfg.epochs}/{cfg.epochs}") and lines[2].endswith("  *")
    assert lines[3].lstrip().startswith(f"1/{cfg.epochs}") and not lines[3].endswith("*")
    assert "0.750" in lines[2] and "5.00e-05" in lines[2] and "f1_N" not in lines[1]  # per-class: metrics.csv

"""train.log (the console, without progress-bar noise) and --tensorboard, without training."""
from __future__ import annotations

import sys

import pytest

import runlog


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

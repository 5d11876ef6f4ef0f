"""Configs in and out (--config, --print-config), --resume with more epochs, honest --help, and train.log."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from odir_dual.common.cli import EXIT_USAGE, NothingToRun, UsageError
from odir_dual.training import config
from odir_dual import train
from test_train import TINY, tiny_odir  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[1]


def _metrics(run_dir: Path) -> list[dict]:
    """metrics.csv without the columns that measure the machine (seconds, pairs/s, data %), not the model."""
    with open(run_dir / "metrics.csv") as f:
        return [{k: v for k, v in row.items() if not k.endswith(("_s", "_pct"))} for row in csv.DictReader(f)]


# ----------------------------------------------------------------------------------------------- files, no training


def test_print_config_is_a_config_file_and_flags_override_it(tmp_path, capsys):
    with pytest.raises(NothingToRun):  # printed; a library call keeps its process (train.py ends with status 0)
        config.parse_config(["--preset", "seed", "--epochs", "7", "--print-config"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["preset"] == "seed" and printed["epochs"] == 7 and printed["backbone"] == "convnext_small"
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**printed, "name": "old-run", "resume": "runs/x"}))
    cfg = config.parse_config(["--config", str(path), "--lr", "0.01"])
    want = {**printed, "lr": 0.01}
    want.pop("name"), want.pop("resume")  # a config file never names or resumes a run: a rerun is a new run
    assert {k: v for k, v in asdict(cfg).items() if k in want} == want
    assert cfg.name == "" and cfg.resume == ""


def test_yaml_config_and_bad_files_name_the_problem(tmp_path):
    pytest.importorskip("yaml")
    path = tmp_path / "exp.yaml"
    path.write_text("preset: demo\nimg_px: 96\nsame_eye_aug: true\n")
    cfg = config.parse_config(["--config", str(path)])
    assert (cfg.preset, cfg.img_px, cfg.same_eye_aug, cfg.backbone) == ("demo", 96, True, "test_resnet")
    path.write_text("img_px: big\n")
    with pytest.raises(config.ConfigError, match=r"exp.yaml: field 'img_px' is 'big', expected"):
        config.parse_config(["--config", str(path)])
    with pytest.raises(config.ConfigError, match="missing.json"):
        config.parse_config(["--config", str(tmp_path / "missing.json")])


def test_backbone_args_are_checked_when_the_flags_are_read():
    cfg = config.parse_config(["--backbone-args", '{"channels": [64, 96, 96, 192]}'])
    assert config.backbone_args(cfg.backbone_args) == {"channels": [64, 96, 96, 192]}
    with pytest.raises(config.ConfigError, match=r"--backbone-args .*not valid JSON"):
        config.parse_config(["--backbone-args", '{"channels": [64'])
    with pytest.raises(config.ConfigError, match=r"--backbone-args .*expected a JSON object"):
        config.parse_config(["--backbone-args", "[64, 96]"])


def test_help_says_what_each_flag_does_its_choices_and_preset_values(capsys):
    with pytest.raises(NothingToRun):
        config.parse_config(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # unwrapped
    assert "--preset {auto,seed,fast,demo,cpu}" in text and "--precision {auto,bf16,fp16,fp32}" in text
    here = "demo*" if not torch.cuda.is_available() else "fast*"
    assert f"any timm model name [seed/fast{'*' if here == 'fast*' else ''}: 'convnext_small'; " in text
    assert f"{here}" in text  # the preset that runs with no flags on this machine is marked
    for f in config.fields(config.Config):  # every field has a flag with a help text, not just a default
        assert f.metadata.get("help"), f.name


def test_each_field_declares_its_help_and_help_prints_it(capsys):
    """The help text is the field's own metadata (config.option), and --help prints it beside the flag."""
    for f in config.fields(config.Config):
        assert isinstance(f.metadata.get("help"), str) and f.metadata["help"].strip(), f.name
    with pytest.raises(NothingToRun):
        config.parse_config(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # unwrapped
    for f in config.fields(config.Config):  # field names in a help text are written as flags (img_px → --img-px)
        assert " ".join(config._flag_names(f.metadata["help"]).split()) in text, f.name
    assert "--img-px N training and inference image side, pixels [" in text
    assert "--prepare-px N short side of the prepared copies, pixels; 0: same as --img-px" in text
    assert "--model-ema-decay X per optimizer update [" in text


def test_help_is_grouped_and_says_nothing_about_the_code(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "110")
    with pytest.raises(NothingToRun):
        config.parse_config(["--help"])
    text = capsys.readouterr().out
    sections = [line[:-1] for line in text.splitlines() if line and not line.startswith(" ") and line.endswith(":")]
    assert sections == ["options", "config files", *config.FLAG_GROUPS]
    assert list(config.FLAG_GROUPS)[1:] == ["data", "model", "optimisation", "loss", "calibration", "speed"]
    grouped = [name for names in config.FLAG_GROUPS.values() for name in names]
    assert sorted(grouped) == sorted(f.name for f in config.fields(config.Config))  # each field once
    for note in ("Size (over", "`fit`", "`main`", "config.Config", "img_px", "select_metric ("):
        assert note not in text, note
    assert max(map(len, text.splitlines())) <= 110


@pytest.mark.parametrize("argv, suggestion", [
    (["--epcohs", "3"], "unknown flag --epcohs; did you mean --epochs"),
    (["--epoch", "3"], "unknown flag --epoch; did you mean --epochs?"),  # no abbreviations: refused, not taken
    (["--lr", "0.1", "--batchsize=4"], "unknown flag --batchsize; did you mean --batch-size"),
])
def test_unknown_flags_get_a_suggestion_in_a_few_lines(argv, suggestion, capsys):
    with pytest.raises(UsageError) as e:  # the library call raises the text ...
        config.parse_config(argv)
    assert train.cli(argv) == EXIT_USAGE  # ... which the command line prints, ending with argparse's status
    err = capsys.readouterr().err.strip().splitlines()
    assert err == str(e.value).splitlines()
    assert err[0].startswith(f"train.py: error: {suggestion}") and len(err) <= 4
    assert err[-1] == "python train.py --help lists every flag"


@pytest.mark.parametrize("argv, status", [(["--help"], 0), (["--epcohs", "3"], 2)])
def test_help_and_a_mistyped_flag_answer_before_torch_is_imported(argv, status):
    """train.py reads its flags before the heavy imports: --help and a typo answer in well under 2 s on a CPU."""
    p = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / "train.py"), *argv], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == status, p.stderr[-2000:]
    imported = {line.split("|")[-1].strip() for line in p.stderr.splitlines() if line.startswith("import time:")}
    assert imported and not imported & {"torch", "timm", "nvidia.dali", "pandas", "numpy"}, sorted(imported)
    assert ("--epochs N" in p.stdout) if status == 0 else ("did you mean --epochs" in p.stderr)


def test_console_names_only_the_settings_that_differ_from_the_preset():
    cfg = config.resolve_config({"preset": "cpu", "epochs": 1, "img_px": 64, "data": "/d", "name": "x"})
    epochs, px = config.PRESETS["cpu"]["epochs"], config.PRESETS["cpu"]["img_px"]
    assert config.changed_settings(cfg) == {"epochs": (1, epochs), "img_px": (64, px)}
    text = config.format_settings(cfg, every="runs/x/config.json")
    assert text == (f"preset cpu; changed: --img-px 64 (cpu: {px}), --epochs 1 (cpu: {epochs}); every setting: "
                    "runs/x/config.json")
    assert config.format_settings(config.resolve_config({"preset": "seed"})) == "preset seed, no setting changed"


def test_a_missing_data_folder_is_one_line_before_anything_else(tmp_path, capsys):
    assert train.cli(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "runs")]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.strip().splitlines() == [f"train.py: error: ODIR data folder not found: "
                                                      f"{tmp_path / 'nowhere'}"]
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------------------------- with training


@pytest.fixture(scope="module")
def logged_run(tiny_odir, tmp_path_factory):
    """A finished tiny run, started as a user would with its output redirected to a file: (run folder, output)."""
    out = tmp_path_factory.mktemp("runs")
    args = [sys.executable, str(ROOT / "train.py"), "--data", str(tiny_odir), "--out", str(out), "--name", "a",
            "--cache-dir", str(out / "cache"), *TINY]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # stdout and stderr reach the pipe in the order written
    proc = subprocess.run(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    return out / "a", proc.stdout


def test_train_log_holds_the_whole_console_output_without_carriage_returns(logged_run):
    run_dir, console = logged_run
    log = (run_dir / "train.log").read_text()
    assert "\r" not in log and "\x1b" not in log
    assert log == console  # everything, from the first line (printed before the run folder existed) to the last
    assert log.startswith("odir-dual · commit") and "thresholds:" in log  # the final report's last line


def test_rerun_from_config_json_reproduces_the_metrics(logged_run, tmp_path):
    run_dir, _ = logged_run
    train.main(["--config", str(run_dir / "config.json"), "--out", str(tmp_path), "--name", "again"])
    assert _metrics(tmp_path / "again") == _metrics(run_dir)


def test_resume_runs_added_epochs_and_refuses_other_changes(logged_run, tmp_path, capsys):
    import shutil

    run_dir = tmp_path / "a"
    shutil.copytree(logged_run[0], run_dir)
    done = torch.load(run_dir / "last.pt", weights_only=True)
    with pytest.raises(config.ConfigError) as e:
        train.main(["--resume", str(run_dir), "--epochs", "3", "--lr", "0.5", "--img-px", "64"])
    assert "--lr 0.5 (the run has 0.001)" in str(e.value) and "--img-px 64 (the run has 48)" in str(e.value)
    assert "--epochs" not in str(e.value).split("cannot change")[1].split(".")[0]  # a larger --epochs is allowed
    with pytest.raises(config.ConfigError, match="--epochs 1"):
        train.main(["--resume", str(run_dir), "--epochs", "1"])
    capsys.readouterr()
    train.main(["--resume", str(run_dir), "--epochs", "3", "--lr", "0.001"])  # the run's own lr: no change
    out = capsys.readouterr().out
    assert f"resumed {run_dir} at update {done['step']}: epoch {done['epoch'] + 2} of 3" in out  # from 1
    last = torch.load(run_dir / "last.pt", weights_only=True)
    assert last["step"] == done["step"] * 3 // 2 and last["config"]["epochs"] == 3
    rows = _metrics(run_dir)
    assert [r["epoch"] for r in rows] == ["1", "2", "3"] and rows[:2] == _metrics(logged_run[0])
    assert (run_dir / "train.log").read_text().count("odir-dual · commit") == 2  # the log continues


def test_a_finished_run_ends_with_the_next_commands_and_they_work(logged_run, tmp_path):
    """The last lines name export, score and the report with the run's real paths; the export line runs as printed."""
    import shlex

    run_dir, console = logged_run
    lines = console.rstrip("\n").splitlines()
    start = lines.index("next steps:")
    steps = [line.split("#")[0].strip() for line in lines[start + 1:] if not line.strip().startswith("#")]
    def where(path) -> str:  # as train.py writes paths: relative to its working directory (ROOT) when inside it
        path = os.path.abspath(path)
        return os.path.relpath(path, ROOT) if path.startswith(str(ROOT) + os.sep) else path

    run, python = where(run_dir), where(sys.executable)
    assert steps == [f"{python} export.py {run}",
                     f"{python} score.py {run} FOLDER -o predictions.xlsx --report scored",
                     f"xdg-open {run}/report.html"]
    assert (run_dir / "report.html").is_file()
    proc = subprocess.run(shlex.split(steps[0]), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (run_dir / "best.onnx").is_file()
    score_line = [line for line in proc.stdout.splitlines() if "score.py" in line]
    assert score_line and f"score.py {run} FOLDER" in score_line[-1]  # export.py names the next command too

"""The fault suite (issue 9): every bad input and fault a new user met, as a test, so none of them comes back.

Each test is one case of the issue (numbered as there: 1 stale predictions, 2 mixed run folders, 3 sheet file
names, 4 score.py's end of run, 5 workers outliving their parent, 6 unchecked model shapes, 7 tracebacks instead of
messages, 8 the smaller ones), plus the cases that already held and had no test yet (decompression bombs). The
other cases that already held are tested where their code lives: tests/test_prepare.py (truncated, empty,
PNG-as-JPEG, CMYK, grayscale images), tests/test_train.py (kill -9 during a checkpoint write, resume equality,
Ctrl-C → exit 130), tests/test_export.py (malicious pickles).

Exit statuses (docs/data.md): 0 ok, 1 bad input (one line naming the file, row, column or flag), 2 bad
command line, 130 / 143 stopped by SIGINT / SIGTERM.
"""
from __future__ import annotations

import csv
import errno
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from odir_dual.training import checkpoint
from odir_dual import export
from odir_dual.deploy import runtime
from odir_dual import score
from odir_dual.deploy import predictions
from odir_dual import train
from odir_dual.common.cli import EXIT_BAD_INPUT, EXIT_SIGINT, EXIT_SIGTERM, run_cli
from odir_dual.pipeline.odir import SheetError, read_patients
from odir_dual.pipeline.prepare import prepare_paths
from odir_dual.training.runlog import RunFolderError, run_folder
from test_export import make_checkpoint, tiny_checkpoint, tiny_onnx  # noqa: F401 (fixtures)
from test_odir import make_dataset, small, write_sheet
from test_score import fundus, pair_folder, read_csv

ROOT = Path(__file__).resolve().parents[1]
TINY_TRAIN = ["--backbone", "test_resnet", "--no-pretrained", "--img-px", "48", "--embed-dim", "32", "--heads",
              "4", "--batch-size", "4", "--epochs", "1", "--loader-threads", "1", "--no-weighted-sampling",
              "--folds", "0"]
SYS_READ_ONLY = Path("/sys")  # read-only even for root (tests here may run as root, where chmod protects nothing)


@pytest.fixture(scope="module")
def tiny_odir(tmp_path_factory):
    """A 24-patient synthetic ODIR folder (data.xlsx + images), 64-96 px."""
    from odir_dual.pipeline.synthetic import make_synthetic_odir

    return make_synthetic_odir(tmp_path_factory.mktemp("odir"), n_patients=24, seed=3, min_px=64, max_px=96,
                               workers=1)


def train_args(tmp_path, data, *extra, name="run"):
    return ["--data", str(data), "--out", str(tmp_path / "runs"), "--name", name, "--cache-dir",
            str(tmp_path / "cache"), *TINY_TRAIN, *extra]


def same_times(path: Path, like: os.stat_result) -> None:
    """Put `like`'s access and modification times back on path, as `cp -p` or `touch -r` do."""
    os.utime(path, ns=(like.st_atime_ns, like.st_mtime_ns))


# ----------------------------------------------------------------------------------------------- 1 stale cache


def test_1a_replaced_image_with_old_timestamp_is_prepared_again(tmp_path):
    src = fundus(tmp_path / "1_left.jpg", seed=1)
    other = fundus(tmp_path / "other.jpg", seed=2)
    first, _ = prepare_paths([src], tmp_path / "cache", 64, workers=1, progress=False)
    before = os.stat(src)
    shutil.copyfile(other, src)  # another patient's image, in place (same inode)...
    same_times(src, before)  # ...with the old time stamp, as `cp -p` leaves it
    again, _ = prepare_paths([src], tmp_path / "cache", 64, workers=1, progress=False)
    fresh, _ = prepare_paths([other], tmp_path / "fresh", 64, workers=1, progress=False)
    assert np.array_equal(np.asarray(Image.open(again[0])), np.asarray(Image.open(fresh[0])))


def test_1b_corrupt_replacement_with_old_timestamp_is_caught(tmp_path):
    src = fundus(tmp_path / "1_left.jpg", seed=1)
    prepare_paths([src], tmp_path / "cache", 64, workers=1, progress=False)
    before = os.stat(src)
    good = src.read_bytes()
    src.write_bytes(good[: len(good) // 2])
    same_times(src, before)
    prepared, reasons = prepare_paths([src], tmp_path / "cache", 64, workers=1, progress=False)
    assert prepared == [None] and reasons == ["truncated JPEG"]


# ----------------------------------------------------------------------------------------------- 2 run folders


def test_2a_existing_run_name_needs_resume_or_overwrite(tmp_path, tiny_odir, capsys):
    old = tmp_path / "runs" / "run"
    old.mkdir(parents=True)
    (old / "config.json").write_text("{}")
    (old / "best.pt").write_bytes(b"an earlier run's checkpoint")
    assert train.cli(train_args(tmp_path, tiny_odir)) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert f"run folder {old} exists: --resume {old} continues it, --overwrite replaces it" in err
    assert (old / "best.pt").read_bytes() == b"an earlier run's checkpoint"  # untouched
    assert not (tmp_path / "cache").exists()  # refused before any work


def test_2b_a_run_folder_in_use_is_refused(tmp_path, tiny_odir, capsys):
    folder = tmp_path / "runs" / "run"
    with run_folder(folder):  # another training holds it (the lock is per open file: the same process counts)
        (folder / "config.json").write_text("{}")
        assert train.cli(train_args(tmp_path, tiny_odir, "--overwrite")) == EXIT_BAD_INPUT
        assert "is in use by a training that is still running (pid" in capsys.readouterr().err
        with pytest.raises(RunFolderError, match="exists"):  # a second new run of the same name
            with run_folder(folder):
                pass
    assert (folder / "config.json").exists()


def test_2c_default_run_names_never_collide(tmp_path):
    base = tmp_path / "20261127-101500"  # two runs started in the same second
    with run_folder(base, unique=True) as a, run_folder(base, unique=True) as b:
        (a / "last.pt").write_bytes(b"x")
        (b / "last.pt").write_bytes(b"x")
    assert (a, b) == (base, base.with_name(base.name + "-2"))


def test_2d_overwrite_replaces_run_folders_only_and_failures_leave_no_folder(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / "metrics.csv").write_text("old rows\n")
    with run_folder(run, overwrite=True) as folder:  # a run folder from before the marker: its files, no marker
        assert sorted(p.name for p in folder.iterdir()) == [".lock", ".odir-run"]  # the old run's files are gone
        (folder / "best.pt").write_bytes(b"new")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.tex").write_text("precious")
    with pytest.raises(RunFolderError, match="not a run folder"):
        with run_folder(notes, overwrite=True):
            pass
    assert (notes / "thesis.tex").read_text() == "precious"
    with pytest.raises(ValueError, match="bad data"):
        with run_folder(tmp_path / "failed"):
            raise ValueError("bad data")  # before any checkpoint
    assert not (tmp_path / "failed").exists()


# ----------------------------------------------------------------------------------------------- 3 sheet names


@pytest.mark.parametrize("name, accepted", [("sub/0_left.jpg", True), ("../0_left.jpg", False),
                                            ("/etc/0_left.jpg", False), ("sub/../../0_left.jpg", False)])
def test_3_sheet_file_names_stay_inside_the_images_folder(tmp_path, name, accepted):
    df = small()
    df.loc[0, "Left-Fundus"] = name
    sheet = make_dataset(tmp_path / "d", df, sheet="data.csv", images="images", skip=[name])
    if accepted:
        (tmp_path / "d" / "images" / "sub").mkdir(exist_ok=True)
        (tmp_path / "d" / "images" / name).touch()
        patients, missing = read_patients(sheet)
        assert patients["left"][0] == str(tmp_path / "d" / "images" / name) and missing.empty
    else:
        (tmp_path / "0_left.jpg").touch()  # what ../0_left.jpg would reach
        with pytest.raises(SheetError, match=r"data\.csv: row 2, column 'Left-Fundus': an image file name must "
                                             r"name a file inside the images folder"):
            read_patients(sheet)


# ----------------------------------------------------------------------------------------------- 4 + 8 scoring


class BatchSpy:
    """Records the batch size onnxruntime is asked to run."""

    def __init__(self):
        self.sizes = []
        self.real = runtime.OrtRunner.__call__

    def __call__(self, runner, left, right):
        self.sizes.append(int(left.shape[0]))
        return self.real(runner, left, right)


@pytest.fixture(scope="module")
def scored(tiny_onnx, tmp_path_factory):
    """One score.py run over a folder holding what broke it: an undecodable file name, formula IDs, a subfolder;
    --batch-size 50 on 5 pairs."""
    tmp = tmp_path_factory.mktemp("scored")
    folder = pair_folder(tmp / "images", [1, 2])
    for k, pid in enumerate([b"3\xff", b"=1+2", b"@SUM(A1)"]):
        for eye in ("left", "right"):
            name = os.fsdecode(pid + f"_{eye}.jpg".encode())
            shutil.copyfile(fundus(tmp / f"{k}{eye}.jpg", 10 * k + len(eye)), folder / name)
    fundus(folder / "more" / "4_left.jpg", 40)  # a subfolder
    out, spy = tmp / "pred.csv", BatchSpy()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runtime.OrtRunner, "__call__", lambda runner, l, r: spy(runner, l, r))
        status = score.main([str(tiny_onnx["path"]), str(folder), "-o", str(out), "--cache-dir", str(tmp / "c"),
                             "--workers", "1", "--batch-size", "50", "--loader", "dali"])
    return dict(status=status, out=out, sizes=spy.sizes)


def test_4a_undecodable_file_name_is_scored_and_written(scored):
    assert scored["status"] == 0
    text = scored["out"].read_bytes().decode("utf-8")  # valid UTF-8 throughout
    rows = {r["ID"]: r for r in csv.DictReader(text.splitlines())}
    assert predictions.is_scored(rows["3\\xff"]["status"]) and rows["3\\xff"]["p_N"] != ""


def test_4b_unwritable_output_fails_before_any_work(tiny_onnx, tmp_path, capsys):
    folder = pair_folder(tmp_path / "images", [1])
    (tmp_path / "a_folder").mkdir()
    targets = [tmp_path / "a_folder", folder / "1_left.jpg" / "pred.csv"]
    if SYS_READ_ONLY.is_dir():
        targets.append(SYS_READ_ONLY / "pred.csv")
    for out in targets:
        status = score.main([str(tiny_onnx["path"]), str(folder), "-o", str(out), "--cache-dir",
                             str(tmp_path / "c"), "--workers", "1"])
        err = capsys.readouterr().err
        assert status == EXIT_BAD_INPUT and err.startswith(f"score.py: error: -o {out}") and "Traceback" not in err
    assert not (tmp_path / "c").exists()  # nothing prepared, nothing scored


def test_4c_disk_full_at_the_end_is_one_line_and_leaves_no_temporary_file(tiny_onnx, tmp_path, capsys,
                                                                         monkeypatch):
    folder = pair_folder(tmp_path / "images", [1])
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    real_writer = csv.writer

    def full_disk(f, **kw):
        w = real_writer(f, **kw)

        class Writer:
            def writerow(self, row):
                w.writerow(row)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return Writer()

    monkeypatch.setattr(csv, "writer", full_disk)  # (the csv module deploy/predictions.py writes with)
    status = score.main([str(tiny_onnx["path"]), str(folder), "-o", str(out_dir / "pred.csv"), "--cache-dir",
                         str(tmp_path / "c"), "--workers", "1"])
    err = capsys.readouterr().err
    assert status == EXIT_BAD_INPUT
    assert f"score.py: error: cannot write {out_dir / 'pred.csv'}: No space left on device" in err
    assert list(out_dir.iterdir()) == []  # no partial CSV, no temporary file


@pytest.mark.parametrize("junk", [[], ["notes.txt"]])
def test_4d_empty_or_junk_folder_is_one_line(tiny_onnx, tmp_path, capsys, junk):
    folder = tmp_path / "images"
    folder.mkdir()
    for name in junk:
        (folder / name).write_text("x")
    out = tmp_path / "pred.csv"
    status = score.main([str(tiny_onnx["path"]), str(folder), "-o", str(out), "--cache-dir", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert status == EXIT_BAD_INPUT and f"score.py: error: {folder}: no patient images to score" in err
    assert ("found only: notes.txt" in err) if junk else ("(it is empty)" in err)
    assert not out.exists()


def test_8d_last_batch_is_not_padded(scored):
    assert scored["sizes"] == [5]  # --batch-size 50 on 5 pairs: one batch of 5, not 50


def test_8e_formula_ids_are_escaped_in_the_csv(scored):
    ids = [r["ID"] for r in read_csv(scored["out"])]
    assert "'=1+2" in ids and "'@SUM(A1)" in ids and "=1+2" not in ids


def test_8f_subfolders_are_reported(scored):
    from odir_dual.pipeline.pairs import find_pairs

    ignored = find_pairs(scored["out"].parent / "images").ignored
    assert ("more/", "a subfolder: not searched, score it on its own") in ignored


# ----------------------------------------------------------------------------------------------- 5 workers


def descendants(pid: int) -> set[int]:
    """Every live process below pid (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            found.add(c)
            todo.append(c)
    return found


def alive(pids) -> set[int]:
    """The pids that still run (a zombie waiting to be reaped has ended)."""
    out = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            out.add(pid)
    return out


def start_scoring_and_wait_for_workers(tiny_onnx, tmp_path):
    """score.py on 100 pairs with 2 preparation workers, returned once the pool is at work."""
    one = fundus(tmp_path / "one.jpg", 1, size=(800, 600))
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(100):
        for eye in ("left", "right"):
            shutil.copyfile(one, folder / f"{i}_{eye}.jpg")
    cache = tmp_path / "c"
    p = subprocess.Popen([sys.executable, str(ROOT / "score.py"), str(tiny_onnx["path"]), str(folder), "-o",
                          str(tmp_path / "pred.csv"), "--cache-dir", str(cache), "--workers", "2"], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=open(tmp_path / "stderr.txt", "w"))  # no pipe to fill
    deadline = time.time() + 300  # generous: on a busy 2-core CI machine importing torch and DALI alone takes long
    procs: set[int] = set()
    while time.time() < deadline and p.poll() is None:
        procs = descendants(p.pid)  # forkserver, resource tracker, 2 workers
        if len(procs) >= 4 and len(list(cache.glob("*px/*.jpg"))) >= 2:
            return p, procs
        time.sleep(0.05)
    p.kill()
    raise AssertionError(f"the preparation pool was not seen at work (exit status {p.poll()}, processes {procs})")


def wait_until_gone(pids, seconds=60.0) -> set[int]:  # returns as soon as they are gone; 60 s for a busy machine
    deadline = time.time() + seconds
    while alive(pids) and time.time() < deadline:
        time.sleep(0.1)
    return alive(pids)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_5a_sigterm_during_preparation_says_so_and_leaves_no_process(tiny_onnx, tmp_path):
    p, procs = start_scoring_and_wait_for_workers(tiny_onnx, tmp_path)
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=120)
    err = (tmp_path / "stderr.txt").read_text()
    assert p.returncode == EXIT_SIGTERM, err[-2000:]
    assert "score.py: stopped by SIGTERM" in err and "Traceback" not in err
    assert wait_until_gone(procs) == set()
    assert not (tmp_path / "pred.csv").exists()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_5b_kill9_during_preparation_leaves_no_process(tiny_onnx, tmp_path):
    p, procs = start_scoring_and_wait_for_workers(tiny_onnx, tmp_path)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    assert wait_until_gone(procs) == set()


# ----------------------------------------------------------------------------------------------- 6 model shapes


def onnx_model(path: Path, meta: dict, *, batch="N", img_px=64, outputs=("probs", "logits")) -> Path:
    """A small hand-made model with our inputs/outputs and metadata: (left + right) → mean over pixels → 8 logits."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    shape = [batch, 3, img_px, img_px]
    w = numpy_helper.from_array(np.ones((3, 8), np.float32), "w")
    nodes = [helper.make_node("Add", ["left", "right"], ["both"]),
             helper.make_node("GlobalAveragePool", ["both"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["flat"]),
             helper.make_node("MatMul", ["flat", "w"], ["logits"]),
             helper.make_node("Sigmoid", ["logits"], ["probs"])]
    nodes += [helper.make_node("Identity", ["logits"], [o]) for o in outputs if o not in ("probs", "logits")]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("left", "right")],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, [batch, 8]) for o in outputs], initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    helper.set_model_props(model, meta)
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("case, kwargs, meta_change, message", [
    ("fixed 32 px input", dict(img_px=32), {}, r"input left has shape \['N', 3, 32, 32\], but its metadata says "
                                               r"\(N, 3, 64, 64\)"),
    ("fixed batch", dict(batch=1), {}, r"input left has a fixed batch of 1"),
    ("3 outputs", dict(outputs=("probs", "logits", "extra")), {}, r"outputs probs, logits, extra; expected exactly"),
    ("3 thresholds", {}, {"thresholds": "[0.5, 0.5, 0.5]"}, r"3 thresholds \[0.5, 0.5, 0.5\] in the metadata"),
])
def test_6a_onnx_shapes_and_metadata_are_checked_when_loading(tiny_onnx, tmp_path, capsys, case, kwargs,
                                                              meta_change, message):
    _, meta, _ = runtime.load_session(tiny_onnx["path"], "cpu")
    raw = {**meta["raw"], **meta_change}
    good = onnx_model(tmp_path / "good.onnx", meta["raw"])
    runtime.load_session(good, "cpu")  # the hand-made model itself is fine
    bad = onnx_model(tmp_path / "bad.onnx", raw, **kwargs)
    with pytest.raises(runtime.ModelFileError, match=message):
        runtime.load_session(bad, "cpu")
    folder = pair_folder(tmp_path / "images", [1])
    assert score.main([str(bad), str(folder), "-o", str(tmp_path / "p.csv"), "--cache-dir",
                       str(tmp_path / "c")]) == EXIT_BAD_INPUT
    assert "Traceback" not in capsys.readouterr().err
    assert not (tmp_path / "c").exists()  # refused before any image was prepared


def test_6b_export_refuses_bad_thresholds_and_overwriting_the_checkpoint(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "run" / "best.pt")
    before = ckpt.read_bytes()
    assert export.main([str(ckpt), "-o", str(ckpt)]) == EXIT_BAD_INPUT
    assert "would overwrite a checkpoint" in capsys.readouterr().err
    assert ckpt.read_bytes() == before
    payload = torch.load(ckpt, weights_only=True)
    payload["thresholds"] = [0.5, 0.5, 0.5]
    checkpoint.save_checkpoint(payload, tmp_path / "three.pt")
    assert export.main([str(tmp_path / "three.pt"), "-o", str(tmp_path / "three.onnx")]) == EXIT_BAD_INPUT
    assert "thresholds [0.5, 0.5, 0.5]; expected 8 numbers in [0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "three.onnx").exists()


# ----------------------------------------------------------------------------------------------- 7 messages


def test_7a_data_that_is_no_sheet_is_one_line(tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("not a sheet\n")
    garbage = make_dataset(tmp_path / "d", small())
    garbage.write_bytes(os.urandom(2000))  # data.xlsx that is no workbook
    for data, message in [(text, "not an annotation sheet"), (tmp_path / "d", "cannot be read as an Excel")]:
        with pytest.raises(SheetError, match=message):
            read_patients(data)
        assert train.cli(["--data", str(data), "--dry-run"]) == EXIT_BAD_INPUT
        err = capsys.readouterr().err
        assert err.startswith("train.py: error: ") and message in err and "Traceback" not in err


def test_7b_too_few_patients_for_one_batch_leaves_no_run_folder(tmp_path, tiny_odir, capsys):
    assert train.cli(train_args(tmp_path, tiny_odir, "--batch-size", "64")) == EXIT_BAD_INPUT
    assert re.search(r"^train\.py: error: \d+ training patients \(of 24 usable\) cannot fill one update of "
                     r"--batch-size 64", capsys.readouterr().err, re.MULTILINE)
    assert not (tmp_path / "runs").exists() or list((tmp_path / "runs").iterdir()) == []


@pytest.mark.skipif(not SYS_READ_ONLY.is_dir(), reason="needs a read-only /sys")
@pytest.mark.parametrize("flag", ["--out", "--cache-dir"])
def test_7c_read_only_out_or_cache_is_one_line(tmp_path, tiny_odir, capsys, flag):
    args = train_args(tmp_path, tiny_odir)
    args[args.index(flag) + 1] = str(SYS_READ_ONLY / "odir-dual")
    assert train.cli(args) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith(f"train.py: error: {SYS_READ_ONLY / 'odir-dual'}: ") and "Traceback" not in err
    assert re.search(r": (Permission denied|Operation not permitted|Read-only file system)$", err.strip())
    assert [p.name for p in (tmp_path / "runs").glob("*")] == []  # no run folder left without a checkpoint


def test_7d_disk_full_while_saving_a_checkpoint(tmp_path, tiny_odir, capsys, monkeypatch):
    real_save = torch.save

    def save_until_full(obj, f, *a, **kw):
        if "optimizer" in obj:  # best.pt is written, then the disk is full for last.pt (the one with the optimizer)
            f.write(b"\0" * 100_000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(checkpoint.torch, "save", save_until_full)
    assert train.cli(train_args(tmp_path, tiny_odir)) == EXIT_BAD_INPUT
    run = tmp_path / "runs" / "run"
    err = capsys.readouterr().err
    assert f"train.py: error: {run / 'last.pt'}: No space left on device" in err
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == [".odir-run"]  # no temporary, no lock
    assert torch.load(run / "best.pt", weights_only=True)["epoch"] == 1  # the checkpoint before is good


def test_7d_temporary_files_of_a_killed_run_are_removed(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no longer runs: the kill -9'ed trainer
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(b"good")
    left = [f".last.pt.tmp{gone.pid}-0a1b2c", f".best.checking{gone.pid}.onnx"]
    for name in left:
        (run / name).write_bytes(b"\0" * 1000)
    mine = run / f".best.pt.tmp{os.getpid()}-0a1b2c"  # a live process's write in progress stays
    mine.write_bytes(b"\0")
    with run_folder(run, resume=True):
        pass
    assert sorted(p.name for p in run.iterdir()) == sorted(["last.pt", mine.name])


@pytest.mark.parametrize("change, message", [({"img_px": "abc"}, "field 'img_px' is 'abc', expected int"),
                                             ({"backbone": "no_such_net"}, "cannot build the network")])
def test_7e_crafted_checkpoint_config_is_one_line(tmp_path, capsys, change, message):
    ckpt = make_checkpoint(tmp_path / "run" / "best.pt")
    payload = torch.load(ckpt, weights_only=True)
    payload["config"].update(change)
    checkpoint.save_checkpoint(payload, ckpt)
    assert export.main([str(ckpt)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith(f"export.py: error: {ckpt}") and message in err and "Traceback" not in err


def test_7f_second_ctrl_c_and_sigterm_end_with_a_message_and_130_or_143(capsys, monkeypatch):
    from odir_dual.training.distributed import StopRequest

    stop = StopRequest()
    try:
        stop._handle(signal.SIGINT, None)  # the first Ctrl-C asks for a stop after this update
        with pytest.raises(KeyboardInterrupt):
            stop._handle(signal.SIGINT, None)  # the second stops at once
    finally:
        stop.restore()

    def interrupted(argv=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "main", interrupted)
    assert train.cli([]) == EXIT_SIGINT
    assert "train.py: stopped by SIGINT (Ctrl-C); stopped at once: last.pt holds the last saved update; continue " \
        "with " in capsys.readouterr().err
    assert run_cli(lambda: os.kill(os.getpid(), signal.SIGTERM) or time.sleep(5), "x") == EXIT_SIGTERM
    assert "x: stopped by SIGTERM" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- 8 sheets


def test_8a_blank_rows_are_skipped_and_row_numbers_stay_true(tmp_path):
    df = small()
    xlsx = make_dataset(tmp_path / "x", df)
    blank = pd.DataFrame([[None] * len(df.columns)], columns=df.columns)
    write_sheet(pd.concat([df.iloc[:1], blank, df.iloc[1:]], ignore_index=True), xlsx)  # a blank row 3
    patients, _ = read_patients(xlsx)
    assert list(patients["id"]) == sorted(df["ID"])
    df.loc[1, "N"] = 7  # a bad label in the second patient's row...
    csv_sheet = make_dataset(tmp_path / "c", df, sheet="data.csv", images="images")
    lines = csv_sheet.read_text().splitlines()
    csv_sheet.write_text("\n".join(lines[:2] + ["", ",,,,", *lines[2:]]) + "\n")  # ...below two blank lines
    with pytest.raises(SheetError, match=r"data\.csv: row 5, column 'N'"):  # line 5, as an editor shows it
        read_patients(csv_sheet)


def test_8c_ids_beyond_int64_are_refused(tmp_path):
    df = small().astype({"ID": object})
    df.loc[1, "ID"] = 2**63 + 5
    sheet = make_dataset(tmp_path / "d", df, sheet="data.csv", images="images")
    with pytest.raises(SheetError, match=r"row 3, column 'ID': a patient ID must be an integer below 2\*\*63, got "
                                         r"9223372036854775813"):
        read_patients(sheet)


# ----------------------------------------------------------------------------------------------- already held


def test_decompression_bomb_is_a_bad_image_not_a_crash(tmp_path):
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb = tmp_path / "bomb_left.png"  # 30000 x 30000 px declared (900 MP) in 70 bytes
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    prepared, reasons = prepare_paths([bomb], tmp_path / "c", 64, workers=1, progress=False)
    assert prepared == [None] and "DecompressionBomb" in reasons[0]

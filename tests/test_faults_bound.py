"""The fault suite, part 3 (issue 29): nothing mixed, nothing lost, no traceback.

Numbered as the issue: 1 --overwrite checks before it deletes, 2 one photograph for two patients or eyes, 3 --resume
bound to its data and weights, 4 images whose data does not fill their header, 5 --report and --explain, 6 a 251-byte
file name, 7 the tracebacks (full disk, ONNX metadata, damaged or foreign checkpoints, odd file names), 8 serve.py's
slow clients, 9 the smaller ones. One tiny training run (module fixture) serves every --resume case.
"""
from __future__ import annotations

import errno
import os
import shutil
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from odir_dual import export, score, serve, train
from odir_dual.deploy import runtime
from odir_dual.common.cli import EXIT_BAD_INPUT
from odir_dual.pipeline.host import OUTPUT_MARKER, atomic_write
from odir_dual.pipeline.pairs import find_pairs, load_prepared, prepare_pairs
from odir_dual.pipeline.prepare import prepare_paths
from odir_dual.training import checkpoint
from odir_dual.training.runlog import MARKER_NAME, run_id
from test_export import make_checkpoint, tiny_checkpoint, tiny_onnx  # noqa: F401 (fixtures)
from test_faults import onnx_model, tiny_odir, train_args  # noqa: F401 (fixture)
from test_faults_hostile import Server, explainer, one_error_line, patient_photos, post  # noqa: F401 (fixture)
from test_odir import make_dataset, small, write_sheet
from test_score import fundus, pair_folder


@pytest.fixture(scope="module")
def trained(tiny_odir, tmp_path_factory):
    """One finished tiny run: (tmp folder, run folder)."""
    tmp = tmp_path_factory.mktemp("trained")
    assert train.cli(train_args(tmp, tiny_odir)) == 0
    return tmp, tmp / "runs" / "run"


def copy_run(trained, tmp_path) -> Path:
    """A copy of the finished run (the same run: its marker and run id come along), to change without harm."""
    run = tmp_path / "runs" / "run"
    shutil.copytree(trained[1], run)
    return run


def resume(tmp_path, run, *extra) -> int:
    """--resume with one more epoch: a finished run's --resume alone has nothing to do and reads no data."""
    return train.cli(["--resume", str(run), "--cache-dir", str(tmp_path / "cache"), "--epochs", "2", *extra])


# ----------------------------------------------------------------------------------------------- 1 checks first


def test_1_overwrite_refused_by_a_later_check_deletes_nothing(trained, tiny_odir, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    status = train.cli(train_args(tmp_path, tiny_odir, "--overwrite", "--batch-size", "64"))
    line = one_error_line(capsys.readouterr().err, "train.py")  # with the prefix (it had none)
    assert status == EXIT_BAD_INPUT and "cannot fill one update of --batch-size 64" in line
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before  # best.pt, last.pt, ... kept


# ----------------------------------------------------------------------------------------------- 2 shared photos


def photo_dataset(tmp_path, df) -> Path:
    """An ODIR folder (data.csv + images/) whose every named image is a distinct small fundus."""
    make_dataset(tmp_path / "d", df, sheet="data.csv", images="images")
    for k, name in enumerate(sorted(set(df["Left-Fundus"]) | set(df["Right-Fundus"]))):
        fundus(tmp_path / "d" / "images" / name, seed=k)
    return tmp_path / "d"


def test_2_one_photograph_for_two_patients_or_both_eyes_is_left_out_by_name(tmp_path):
    df = small()
    df.loc[0, "Left-Fundus"] = df.loc[1, "Left-Fundus"]  # patient 0's row names patient 1's left photograph
    data = photo_dataset(tmp_path, df)
    images = data / "images"  # one photograph for both eyes (a copy under the right eye's name)
    shutil.copyfile(images / df["Left-Fundus"][2], images / df["Right-Fundus"][2])
    found = load_prepared(data, 48, cache_dir=tmp_path / "c", workers=1, progress=False)
    patients, left_out = found.patients, found.left_out
    assert patients.empty and sorted(left_out["id"].unique()) == sorted(df["ID"])
    reason = left_out.set_index(["id", "eye"]).loc[(df["ID"][0], "left"), "reason"]
    assert reason.startswith(f"the same photograph as patient {df['ID'][1]}'s left eye ({df['Left-Fundus'][1]})")
    kept = load_prepared(data, 48, cache_dir=tmp_path / "c", workers=1, progress=False, allow_shared=True)
    assert len(kept.patients) == 3  # --allow-shared-images: the user's choice


def test_2b_a_sheet_that_swaps_a_patients_eyes_is_left_out_by_name(tmp_path):
    df = small()
    df.loc[1, ["Left-Fundus", "Right-Fundus"]] = df.loc[1, ["Right-Fundus", "Left-Fundus"]].to_numpy()
    data = photo_dataset(tmp_path, df)
    found = load_prepared(data, 48, cache_dir=tmp_path / "c", workers=1, progress=False)
    assert sorted(found.patients["id"]) == sorted(df["ID"].drop(1))  # the others are kept
    reasons = found.left_out.set_index(["id", "eye"])["reason"]
    assert reasons[(df["ID"][1], "left")] == "Left-Fundus names a right-eye file (eyes swapped in the sheet?)"
    assert reasons[(df["ID"][1], "right")] == "Right-Fundus names a left-eye file (eyes swapped in the sheet?)"


# ----------------------------------------------------------------------------------------------- 3 --resume


def changed_copy(tiny_odir, tmp_path, change) -> Path:
    data = tmp_path / "data"
    shutil.copytree(tiny_odir, data)
    change(data)
    return data


def test_3a_resume_refuses_other_photographs_under_the_same_names(trained, tiny_odir, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    sheet = pd.read_excel(tiny_odir / "data.xlsx")
    name = sheet["Left-Fundus"][0]

    def replace(data):
        size = Image.open(data / "Training Images" / name).size
        fundus(data / "Training Images" / name, seed=999, size=size)

    data = changed_copy(tiny_odir, tmp_path, replace)
    assert resume(tmp_path, run, "--data", str(data)) == EXIT_BAD_INPUT
    line = one_error_line(capsys.readouterr().err, "train.py")
    assert f"patient {sheet['ID'][0]}'s left photograph changed" in line and "the same photographs and labels" in line
    assert not (run / "train.log").read_text().count(str(data))  # refused before the run folder was touched


def test_3b_resume_refuses_changed_labels(trained, tiny_odir, tmp_path, capsys):
    run = copy_run(trained, tmp_path)

    def swap(data):
        sheet = pd.read_excel(data / "data.xlsx")
        sheet[["D", "G"]] = sheet[["G", "D"]].to_numpy()
        write_sheet(sheet, data / "data.xlsx")

    data = changed_copy(tiny_odir, tmp_path, swap)
    assert resume(tmp_path, run, "--data", str(data)) == EXIT_BAD_INPUT
    assert "labels changed" in one_error_line(capsys.readouterr().err, "train.py")


def test_3c_a_moved_data_folder_or_a_relative_path_resumes(trained, tiny_odir, tmp_path, monkeypatch, capsys):
    run = copy_run(trained, tmp_path)
    moved = changed_copy(tiny_odir, tmp_path, lambda data: None)
    monkeypatch.chdir(moved.parent)
    assert resume(tmp_path, run, "--data", "data") == 0, capsys.readouterr().err  # relative, moved: same content
    assert "resumed" in capsys.readouterr().out
    from odir_dual.training.config import resume_config
    saved = checkpoint.saved_run_config(str(run))
    assert resume_config(saved, {"resume": str(run), "data": os.path.relpath(saved["data"])}).data == saved["data"]


def test_3d_a_checkpoint_of_another_run_is_refused(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    assert run_id(run) is not None and checkpoint.read_checkpoint(run / "last.pt")["run_id"] == run_id(run)
    make_checkpoint(run / "last.pt", seed=3)  # another run's (another model's) checkpoint copied in
    config_before = (run / "config.json").read_text()
    assert resume(tmp_path, run) == EXIT_BAD_INPUT
    assert "belongs to another run" in one_error_line(capsys.readouterr().err, "train.py")
    assert (run / "config.json").read_text() == config_before  # not rewritten
    shutil.copyfile(run / "last.pt", run / "best.pt")
    assert export.main([str(run)]) == EXIT_BAD_INPUT  # best.pt too
    assert "belongs to another run" in one_error_line(capsys.readouterr().err, "export.py")


@pytest.mark.parametrize("damage, message", [
    ("wrong shape", "does not fit this run's network and optimizer"),
    ("no optimizer", "it has no 'optimizer'"),
    ("bad split row", "split.csv: row 3: id must be an integer")])
def test_3e_damaged_resume_inputs_are_one_line(trained, tmp_path, capsys, damage, message):
    run = copy_run(trained, tmp_path)
    if damage == "bad split row":
        lines = (run / "split.csv").read_text().splitlines()
        lines[2] = "x" + lines[2]
        (run / "split.csv").write_text("\n".join(lines) + "\n")
    else:
        payload = torch.load(run / "last.pt", weights_only=True)
        if damage == "wrong shape":
            name = next(k for k, v in payload["model"].items() if v.ndim == 4)
            payload["model"][name] = torch.zeros(1, 1, 1, 1)
        else:
            del payload["optimizer"]
        checkpoint.save_checkpoint(payload, run / "last.pt")
    assert resume(tmp_path, run) == EXIT_BAD_INPUT
    assert message in one_error_line(capsys.readouterr().err, "train.py")


# ----------------------------------------------------------------------------------------------- 4 bad pictures


def with_header_size(jpeg: bytes, width: int, height: int) -> bytes:
    """The JPEG with its frame header (SOF0) claiming width x height: the data stays what it was."""
    at = jpeg.index(b"\xff\xc0")
    return jpeg[:at + 5] + struct.pack(">HH", height, width) + jpeg[at + 9:]


@pytest.mark.parametrize("claimed, reason", [((2400, 2400), "its data ends before"), ((112, 200), "its data ends before")])
def test_4_a_header_claiming_more_pixels_than_the_data_holds_is_left_out(tmp_path, claimed, reason):
    real = fundus(tmp_path / "real.jpg", seed=1).read_bytes()  # 112 x 96 px
    bad = tmp_path / "1_left.jpg"
    bad.write_bytes(with_header_size(real, *claimed))
    prepared, reasons = prepare_paths([bad], tmp_path / "c", 48, workers=1, progress=False)
    assert prepared == [None] and reasons[0].startswith(reason), reasons


def test_4b_a_flat_image_is_blank(tmp_path):
    flat = tmp_path / "flat_left.png"
    Image.new("RGB", (80, 80), (128, 128, 128)).save(flat)
    prepared, reasons = prepare_paths([flat], tmp_path / "c", 48, workers=1, progress=False)
    assert prepared == [None] and reasons[0].startswith("blank"), reasons


# ----------------------------------------------------------------------------------------------- 5 --report, --explain


def score_args(tiny_onnx, tmp_path, *extra):
    folder = pair_folder(tmp_path / "images", [1])
    return [str(tiny_onnx["path"]), str(folder), "-o", str(tmp_path / "p.csv"), "--cache-dir", str(tmp_path / "c"),
            "--workers", "1", *extra]


def test_5a_report_refuses_a_folder_it_did_not_create(tiny_onnx, tmp_path, capsys):
    mine = tmp_path / "site"
    mine.mkdir()
    (mine / "index.html").write_text("my own page")
    assert score.main(score_args(tiny_onnx, tmp_path, "--report", str(mine))) == EXIT_BAD_INPUT
    assert "a folder this project did not create" in one_error_line(capsys.readouterr().err, "score.py")
    assert (mine / "index.html").read_text() == "my own page" and not (tmp_path / "c").exists()


def test_5b_report_folder_is_marked_reusable_and_removed_when_it_fails(tiny_onnx, tmp_path, monkeypatch, capsys):
    out = tmp_path / "new" / "report"
    assert score.main(score_args(tiny_onnx, tmp_path, "--report", str(out))) == 0
    assert (out / OUTPUT_MARKER).is_file() and (out / "index.html").is_file()
    assert score.main(score_args(tiny_onnx, tmp_path, "--report", str(out))) == 0  # ours: written again

    def fails(scored, folder, *a, **kw):
        (Path(folder) / "index.html").write_text("half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(folder) / "index.html"))

    monkeypatch.setattr(score, "write_folder_report", fails)
    other = tmp_path / "other"
    assert score.main(score_args(tiny_onnx, tmp_path, "--report", str(other))) == EXIT_BAD_INPUT
    assert not other.exists()  # created by this run, removed with what it held


def test_5c_explain_checks_the_checkpoint_before_scoring(tiny_onnx, tmp_path, capsys):
    run = tmp_path / "run"
    make_checkpoint(run / "best.pt")
    (run / "best.pt").write_bytes((run / "best.pt").read_bytes()[:3000])
    assert score.main(score_args(tiny_onnx, tmp_path, "--report", str(tmp_path / "r"), "--explain",
                                 str(run))) == EXIT_BAD_INPUT
    line = one_error_line(capsys.readouterr().err, "score.py")
    assert line.startswith(f"score.py: error: --explain {run}: ") and "not a PyTorch checkpoint" in line
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "c").exists()


def test_5d_explain_must_be_the_model_that_scores(tiny_onnx, tmp_path, capsys):
    other = make_checkpoint(tmp_path / "other" / "best.pt", seed=11)
    assert score.main(score_args(tiny_onnx, tmp_path, "--report", str(tmp_path / "r"), "--explain",
                                 str(other))) == EXIT_BAD_INPUT
    assert "is not the model that scores" in one_error_line(capsys.readouterr().err, "score.py")
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "r").exists()
    _, meta, _ = runtime.load_session(tiny_onnx["path"], "cpu")
    ckpt = checkpoint.read_checkpoint(tiny_onnx["checkpoint"])
    assert meta["raw"]["weights_digest"] == checkpoint.weights_digest(ckpt["model"])  # the exported one matches


# ----------------------------------------------------------------------------------------------- 6 long names


def test_6_a_251_byte_file_name_is_prepared_and_written(tmp_path):
    name = "é" * 60 + "x" * 122 + "_left.jpg"  # 251 bytes in UTF-8: legal, the limit is 255
    assert len(name.encode()) == 251
    src = fundus(tmp_path / name, seed=2)
    prepared, reasons = prepare_paths([src], tmp_path / "c", 48, workers=1, progress=False)
    assert reasons == [None] and len(Path(prepared[0]).name) == 36
    with atomic_write(tmp_path / name.replace(".jpg", ".csv")) as f:
        f.write("ok")
    assert (tmp_path / name.replace(".jpg", ".csv")).read_text() == "ok"


# ----------------------------------------------------------------------------------------------- 7 tracebacks


def mounted_tmpfs(where: Path, options: str):
    """Mount a tmpfs at `where` (root only); skip the test where mounting is not allowed."""
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True,
                          text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}): needs root")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)


@pytest.fixture()
def small_disk(tmp_path):
    """A 2 MB tmpfs: a real full disk."""
    yield from mounted_tmpfs(tmp_path / "disk", "size=2m")


@pytest.fixture()
def read_only_disk(tmp_path):
    """A read-only file system (chmod protects nothing from root)."""
    yield from mounted_tmpfs(tmp_path / "ro", "ro,size=1m")


def test_7a_a_real_full_disk_during_torch_save_is_enospc_naming_the_file(small_disk):
    payload = {"weights": torch.randn(1_000_000)}  # 4 MB into 2 MB
    with pytest.raises(OSError) as e:
        checkpoint.save_checkpoint(payload, small_disk / "last.pt")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(small_disk / "last.pt")
    assert list(small_disk.iterdir()) == []  # no temporary file left


@pytest.mark.parametrize("field, value", [("classes", "8"), ("classes", "null"), ("mean", "5"),
                                          ("thresholds", "{}"), ("config", "[1, 2]"), ("img_px", "\"64\"")])
def test_7b_onnx_metadata_of_the_wrong_type_is_refused_before_scoring(tiny_onnx, tmp_path, capsys, field, value):
    _, meta, _ = runtime.load_session(tiny_onnx["path"], "cpu")
    bad = onnx_model(tmp_path / "bad.onnx", {**meta["raw"], field: value})
    with pytest.raises(runtime.ModelFileError, match=f"metadata {field} = "):
        runtime.load_session(bad, "cpu")
    args = score_args(tiny_onnx, tmp_path)
    args[0] = str(bad)
    assert score.main(args) == EXIT_BAD_INPUT
    assert f"metadata {field} = " in one_error_line(capsys.readouterr().err, "score.py")
    assert not (tmp_path / "c").exists()


def test_7c_export_of_a_checkpoint_whose_model_is_a_list_is_one_line(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "run" / "best.pt")
    payload = torch.load(ckpt, weights_only=True)
    payload["model"] = [1, 2]
    checkpoint.save_checkpoint(payload, ckpt)
    assert export.main([str(ckpt)]) == EXIT_BAD_INPUT
    assert "model is a list, not a state dict" in one_error_line(capsys.readouterr().err, "export.py")


def test_7d_a_file_named_like_a_patient_beside_its_eyes(tmp_path):
    folder = tmp_path / "f"
    for name in ("scan.jpg", "scan.jpg_left.jpg", "scan.jpg_right.jpg"):
        fundus(folder / name, seed=len(name))
    found = find_pairs(folder)
    table, ignored = found.table, found.ignored
    assert list(table["id"]) == ["scan.jpg"] and table["status"][0] == "ok"
    assert ignored[0][0] == "scan.jpg" and "not paired" in ignored[0][1]
    assert prepare_pairs(table, tmp_path / "c", 48, workers=1, progress=False)["status"][0] == "ok"


def test_7e_export_into_a_read_only_folder_fails_before_the_work(tmp_path, capsys, monkeypatch, read_only_disk):
    ckpt = make_checkpoint(tmp_path / "run" / "best.pt")

    def never(*a, **kw):
        raise AssertionError("exported: the output folder must be checked first")

    monkeypatch.setattr(export, "to_onnx_proto", never)
    out = read_only_disk / "best.onnx"
    assert export.main([str(ckpt), "-o", str(out)]) == EXIT_BAD_INPUT
    line = one_error_line(capsys.readouterr().err, "export.py")
    assert line.startswith(f"export.py: error: -o {out}: cannot be written there (Read-only file system)")


# ----------------------------------------------------------------------------------------------- 8 serve.py


def slow_client(port: int, stop: threading.Event, every_s: float) -> float:
    """Send a request head one byte at a time; return the seconds until the server closed the connection."""
    head = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n" + b"X-Pad: " + b"a" * 200
    t0 = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            for byte in head:
                if stop.is_set():
                    break
                s.sendall(bytes([byte]))
                time.sleep(every_s)
    except OSError:  # reset or broken pipe: closed by the server
        pass
    return time.monotonic() - t0


def test_8a_a_request_head_sent_byte_by_byte_meets_the_deadline(explainer):
    with Server(explainer, deadline_s=1.0, timeout_s=5.0) as srv:
        stop = threading.Event()
        seconds = slow_client(srv.port, stop, 0.2)  # every read within 5 s: only the deadline ends it
    assert seconds < 4


def test_8b_the_connection_limit_counts_connections_still_sending(explainer, tmp_path):
    with Server(explainer, max_connections=2) as srv:
        idle = [socket.create_connection(("127.0.0.1", srv.port), timeout=10) for _ in range(2)]
        try:
            time.sleep(0.3)  # both accepted, each holding its thread while it sends nothing
            with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as third:
                assert third.recv(100).startswith(b"HTTP/1.0 503")
        finally:
            for s in idle:
                s.close()
        time.sleep(0.3)
        left, right = patient_photos(0, tmp_path)
        assert post(srv.port, {"left": left, "right": right})[0] == 200  # the slots are free again

"""The fault suite, part 2 (issue 19): what a careless or hostile input did (about 60 cases tried), as tests.

Nothing may destroy files, mix patients or take the server down. Numbered as the issue: 1 outputs written over
anything, 2 --overwrite deleting unknown files, 3 serve.py under concurrent uploads, 4 report file names, 5 elongated
images stopping the run, 6 serve.py's Content-Length and pixel limits, 7 the model card pairing another model's
figures; then "and": model outputs, metadata bounds, symlink loops, killed runs, one-line errors, stale
temporaries, curves.png, --name, sheets, FIFO eyes. Every test is fast (tiny synthetic inputs) but the 200-request
load test of serve.py (`-m slow`); a 40-request one runs by default.
"""
from __future__ import annotations

import base64
import errno
import hashlib
import http.client
import io
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from odir_dual.training import checkpoint
from odir_dual import export
from odir_dual.deploy import modelcard
from odir_dual.deploy import runtime
from odir_dual import score
from odir_dual import serve
from odir_dual import train
from odir_dual.common.cli import EXIT_BAD_INPUT
from odir_dual.pipeline.host import OutputError, check_output, remove_stale_temporaries
from odir_dual.pipeline.odir import SheetError, read_patients
from odir_dual.pipeline.pairs import find_pairs, prepare_pairs
from odir_dual.pipeline.prepare import prepare_paths
from odir_dual.training.runlog import MARKER_NAME, RunFolderError, RunLog, run_folder
from test_export import make_checkpoint, tiny_checkpoint, tiny_onnx  # noqa: F401 (fixtures)
from test_faults import TINY_TRAIN, onnx_model
from test_odir import make_dataset, small, write_sheet
from test_score import fundus, pair_folder, read_csv


def one_error_line(err: str, prog: str) -> str:
    """The one `prog: error: ...` line of stderr (asserting there is no traceback and no second line)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    return lines[0]


def dead_pid() -> int:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    return gone.pid


# ----------------------------------------------------------------------------------------------- 1 outputs


def special_output(kind: str, tmp_path: Path, victim: Path) -> Path:
    """An output path that is a FIFO, a symbolic link (to victim), a device node or a folder."""
    out = tmp_path / f"out-{kind}.csv"
    if kind == "fifo":
        os.mkfifo(out)
    elif kind == "symlink":
        out.symlink_to(victim)
    elif kind == "device":
        try:  # a copy of /dev/null's node, made here: the real one is never put at risk
            os.mknod(out, 0o666 | 0o020000, os.makedev(1, 3))
        except (PermissionError, OSError):
            pytest.skip("cannot make a device node here (needs CAP_MKNOD)")
    elif kind == "folder":
        out.mkdir()
    return out


@pytest.mark.parametrize("kind", ["fifo", "symlink", "device"])
def test_1a_score_output_must_be_a_regular_file(tiny_onnx, tmp_path, capsys, kind):
    folder = pair_folder(tmp_path / "images", [1])
    victim = tmp_path / "precious.txt"
    victim.write_text("precious")
    out = special_output(kind, tmp_path, victim)
    before = os.lstat(out)
    status = score.main([str(tiny_onnx["path"]), str(folder), "-o", str(out), "--cache-dir", str(tmp_path / "c"),
                         "--workers", "1"])
    line = one_error_line(capsys.readouterr().err, "score.py")
    assert status == EXIT_BAD_INPUT and line.startswith(f"score.py: error: -o {out}: is a")
    after = os.lstat(out)
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)  # the very same node, not replaced
    assert victim.read_text() == "precious" and not (tmp_path / "c").exists()  # nothing done


@pytest.mark.parametrize("what", ["model", "input image", "annotation sheet"])
def test_1b_score_output_must_not_be_an_input(tiny_onnx, tmp_path, capsys, what):
    model = tmp_path / "m.onnx"
    shutil.copyfile(tiny_onnx["path"], model)
    df = small()
    sheet = make_dataset(tmp_path / "d", df, sheet="data.csv", images="images")
    for name in set(df["Left-Fundus"]) | set(df["Right-Fundus"]):
        fundus(tmp_path / "d" / "images" / name, seed=len(name))
    out = {"model": model, "input image": tmp_path / "d" / "images" / df["Left-Fundus"][0],
           "annotation sheet": sheet}[what]
    before = out.read_bytes()
    status = score.main([str(model), str(tmp_path / "d"), "-o", str(out), "--cache-dir", str(tmp_path / "c"),
                         "--workers", "1"])
    line = one_error_line(capsys.readouterr().err, "score.py")
    assert status == EXIT_BAD_INPUT and f"is the {what}" in line and str(out) in line
    assert out.read_bytes() == before and not (tmp_path / "c").exists()


def test_1b_score_output_must_not_be_the_explained_checkpoint(tiny_onnx, tmp_path, capsys):
    folder = pair_folder(tmp_path / "images", [1])
    ckpt = make_checkpoint(tmp_path / "run" / "best.pt")
    before = ckpt.read_bytes()
    report = tmp_path / "rep"
    report.mkdir()
    os.link(ckpt, report / "index.html")  # the page's name is the checkpoint through a hard link
    explain = ["--explain", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "c")]
    for flag, args in (("-o", ["-o", str(ckpt), "--report", str(tmp_path / "rep2")]),
                       ("--report", ["-o", str(tmp_path / "p.csv"), "--report", str(report)])):
        status = score.main([str(tiny_onnx["path"]), str(folder), *args, *explain])
        line = one_error_line(capsys.readouterr().err, "score.py")
        assert status == EXIT_BAD_INPUT and "is the checkpoint" in line and line.startswith(f"score.py: error: {flag}")
    assert ckpt.read_bytes() == before and not (tmp_path / "c").exists()


def test_1c_export_output_must_be_a_regular_file_and_no_input(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "run" / "best.pt")
    images = pair_folder(tmp_path / "images", [1])
    other_name = tmp_path / "same.onnx"
    os.link(ckpt, other_name)  # the checkpoint under another name: a hard link
    victim = tmp_path / "precious.onnx"
    victim.write_text("precious")
    cases = [(special_output("fifo", tmp_path, victim), "is a FIFO"),
             (special_output("symlink", tmp_path, victim), "is a symbolic link"),
             (other_name, "is the checkpoint"), (images / "1_left.jpg", "is the input image")]
    for out, message in cases:
        before = os.lstat(out)
        args = [str(ckpt), "-o", str(out), "--check-images", str(images)]
        assert export.main(args) == EXIT_BAD_INPUT
        line = one_error_line(capsys.readouterr().err, "export.py")
        assert line.startswith(f"export.py: error: -o {out}: {message}"), line
        assert os.lstat(out).st_ino == before.st_ino
    assert victim.read_text() == "precious"
    assert checkpoint.read_checkpoint(ckpt)["epoch"] == 1


def test_1d_check_output_names_the_flag_and_accepts_plain_files(tmp_path):
    plain = tmp_path / "p.csv"
    check_output(plain, "-o", [("model", tmp_path / "m.onnx")])  # absent: fine
    plain.write_text("old")
    check_output(plain, "-o", [("model", tmp_path / "m.onnx")])  # a regular file: replaced later, fine
    with pytest.raises(OutputError, match=r"^-o .*: is a folder"):
        check_output(tmp_path, "-o")


def test_1e_stale_checking_files_of_killed_exports_are_removed(tmp_path, monkeypatch):
    ckpt = make_checkpoint(tmp_path / "run" / "best.pt")
    stale = tmp_path / "out" / f".best.checking{dead_pid()}.onnx"
    stale.parent.mkdir()
    stale.write_bytes(b"\0" * 1000)  # a kill -9 during an earlier export's checks
    live = tmp_path / "out" / f".other.checking{os.getpid()}.onnx"
    live.write_bytes(b"\0")  # a running export's file stays

    def stop(*a, **kw):
        raise export.ExportCheckError("stopped here: the clean-up is before the export")

    monkeypatch.setattr(export, "to_onnx_proto", stop)
    with pytest.raises(export.ExportCheckError):
        export.export(ckpt, tmp_path / "out" / "best.onnx", log=lambda *a: None)
    assert not stale.exists() and live.exists()
    assert remove_stale_temporaries(tmp_path / "out", kinds=("tmp",)) == []  # kinds are honoured


def test_1f_curves_png_is_written_atomically(tmp_path, monkeypatch):
    import matplotlib.figure

    log = RunLog(tmp_path)
    row = {"epoch": 1, "train_loss": 0.5, "val_loss": 0.6, "train_f1_macro": 0.1, "val_f1_macro": 0.2,
           "val_f1_micro": 0.3, "val_odir": 0.4}
    log.append(row)
    good = (tmp_path / "curves.png").read_bytes()
    real = matplotlib.figure.Figure.savefig

    def killed_mid_write(fig, target, *a, **kw):  # writes part of the picture, then the process "dies"
        if hasattr(target, "write"):
            target.write(good[:100])
        else:
            Path(target).write_bytes(good[:100])
        raise KeyboardInterrupt

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        log.append({**row, "epoch": 2})
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", real)
    assert (tmp_path / "curves.png").read_bytes() == good  # the old picture, whole
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


# ----------------------------------------------------------------------------------------------- 2 run folders


def test_2a_overwrite_deletes_only_what_a_run_writes(tmp_path, capsys):
    run = tmp_path / "run"
    with run_folder(run) as folder:  # a run: its marker, then its files
        (folder / "best.pt").write_bytes(b"old")
    assert (run / MARKER_NAME).is_file()
    (run / "metrics.csv").write_text("old rows\n")
    (run / "tensorboard").mkdir()
    (run / "tensorboard" / "events").write_text("x")
    (run / "thesis.tex").write_text("precious")  # the user's own file
    (run / "notes").mkdir()
    (run / "notes" / "a.txt").write_text("precious")
    with pytest.raises(RunFolderError, match=r"holds 2 entries that a run does not write \(notes/, thesis\.tex\); "
                                             r"not deleting anything"):
        with run_folder(run, overwrite=True):
            pass
    assert (run / "best.pt").read_bytes() == b"old" and (run / "thesis.tex").read_text() == "precious"
    assert (run / "notes" / "a.txt").read_text() == "precious" and (run / "tensorboard" / "events").exists()
    (run / "thesis.tex").unlink()
    shutil.rmtree(run / "notes")
    with run_folder(run, overwrite=True) as folder:
        assert sorted(p.name for p in folder.iterdir()) == [".lock", MARKER_NAME]


def test_2b_a_run_killed_before_its_first_checkpoint_can_be_overwritten_not_resumed(tmp_path, capsys):
    code = ("import sys, os; from pathlib import Path; from odir_dual.training.runlog import run_folder\n"
            "with run_folder(Path(sys.argv[1])) as f:\n"
            "    (f / 'train.log').write_text('preparing images...')\n"
            "    os.kill(os.getpid(), 9)\n")
    run = tmp_path / "runs" / "run"
    subprocess.run([sys.executable, "-c", code, str(run)], check=False)
    assert sorted(p.name for p in run.iterdir()) == [".lock", MARKER_NAME, "train.log"]  # what a kill -9 leaves
    assert train.cli(["--resume", str(run)]) == EXIT_BAD_INPUT
    line = one_error_line(capsys.readouterr().err, "train.py")
    assert "stopped before its first checkpoint" in line and "--overwrite" in line
    with run_folder(run, overwrite=True) as folder:
        assert sorted(p.name for p in folder.iterdir()) == [".lock", MARKER_NAME]


def test_2c_a_folder_without_the_marker_or_a_run_file_is_not_overwritten(tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "train.log").write_text("my own log")  # a name a run writes, but no run made this folder
    with pytest.raises(RunFolderError, match=rf"no {MARKER_NAME} marker"):
        with run_folder(notes, overwrite=True):
            pass
    assert (notes / "train.log").read_text() == "my own log"


@pytest.mark.parametrize("name", ["../x", "/tmp/odir-abs-name", "a/b", ".."])
def test_2d_name_must_stay_inside_out(tmp_path, capsys, name):
    out = tmp_path / "o" / "runs"
    status = train.cli(["--data", str(tmp_path), "--out", str(out), "--name", name, "--cache-dir",
                        str(tmp_path / "cache"), *TINY_TRAIN])
    line = one_error_line(capsys.readouterr().err, "train.py")
    assert status == EXIT_BAD_INPUT and f"--name {name!r}: must be a plain folder name" in line
    assert not (tmp_path / "o" / "x").exists() and not Path("/tmp/odir-abs-name").exists()
    assert not out.exists() and not (tmp_path / "cache").exists()


# ----------------------------------------------------------------------------------------------- 3 + 6 serve.py


@pytest.fixture(scope="module")
def explainer(tmp_path_factory):
    ckpt = make_checkpoint(tmp_path_factory.mktemp("serve") / "best.pt", seed=5)
    return serve.Explainer(ckpt)


class Server:
    """serve.py's handler on 127.0.0.1 (a free port), in a thread, for one test."""

    def __init__(self, explainer, **limits):
        self.httpd = serve.make_server(("127.0.0.1", 0), explainer, "test", **limits)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def multipart(files: dict[str, bytes]) -> tuple[str, bytes]:
    boundary = "odirtestboundary"
    body = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"; filename=\"{k}.jpg\"\r\n"
                    f"Content-Type: image/jpeg\r\n\r\n".encode() + v + b"\r\n" for k, v in files.items())
    return f"multipart/form-data; boundary={boundary}", body + f"--{boundary}--\r\n".encode()


def post(port: int, files: dict[str, bytes], timeout: float = 120) -> tuple[int, str]:
    ctype, body = multipart(files)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/", body=body, headers={"Content-Type": ctype})
        r = conn.getresponse()
        return r.status, r.read().decode()
    finally:
        conn.close()


def raw_request(port: int, head: bytes, timeout: float = 10) -> bytes:
    """Send raw bytes (a request head, no body) and return what comes back until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        return data


def patient_photos(k: int, folder: Path) -> tuple[bytes, bytes]:
    return (fundus(folder / f"{k}_left.jpg", 100 + 2 * k, size=(96, 80)).read_bytes(),
            fundus(folder / f"{k}_right.jpg", 101 + 2 * k, size=(96, 80)).read_bytes())


def body_of(page: str) -> str:
    """The part of an answer page after the form: probabilities and maps."""
    return page.split("</form>", 1)[1]


@pytest.mark.parametrize("head, status", [
    (b"Content-Length: -1\r\n", 400), (b"Content-Length: abc\r\n", 400), (b"Content-Length: +5\r\n", 400),
    (b"", 411), (b"Transfer-Encoding: chunked\r\n", 411), (b"Content-Length: 200000000\r\n", 413)])
def test_6a_content_length_is_checked_before_the_body_is_read(explainer, head, status):
    with Server(explainer) as srv:
        t0 = time.perf_counter()
        answer = raw_request(srv.port, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
                             b"boundary=b\r\n" + head + b"\r\n")  # no body follows: the server must not wait for one
        assert answer.startswith(f"HTTP/1.0 {status}".encode()), answer[:200]
        assert time.perf_counter() - t0 < 5


def png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("size, message", [((8000, 6000), "8000x6000 px is more than 40 MP"),
                                           ((30000, 30000), "too many pixels")])
def test_6b_pixel_count_is_bounded_before_decoding(explainer, tmp_path, monkeypatch, size, message):
    from odir_dual.pipeline import prepare

    left, right = patient_photos(0, tmp_path)

    def never(*a, **kw):
        raise AssertionError("decoded: the pixel count must be checked in the header, before")

    monkeypatch.setattr(prepare, "prepare_image", never)
    with Server(explainer) as srv:
        status, page = post(srv.port, {"left": png_header_only(*size), "right": right})
    assert status == 400 and "left eye: " in page and message in page


def test_6c_a_stalled_client_is_dropped_by_the_socket_timeout(explainer):
    with Server(explainer, timeout_s=0.5) as srv:
        t0 = time.perf_counter()
        answer = raw_request(srv.port, b"POST / HTTP/1.1\r\nHost: x\r\n")  # the head is never finished
        assert time.perf_counter() - t0 < 8 and b"200" not in answer[:20]


def test_6d_concurrency_is_bounded_503_when_full(explainer, tmp_path, monkeypatch):
    left, right = patient_photos(0, tmp_path)
    entered, release = threading.Event(), threading.Event()
    real = serve.explain_upload

    def slow(*a, **kw):
        entered.set()
        release.wait(30)
        return real(*a, **kw)

    monkeypatch.setattr(serve, "explain_upload", slow)
    with Server(explainer, max_concurrent=1, queue_wait_s=0.2) as srv:
        first = ThreadPoolExecutor(1).submit(post, srv.port, {"left": left, "right": right})
        assert entered.wait(30)
        assert post(srv.port, {"left": left, "right": right})[0] == 503
        release.set()
        assert first.result()[0] == 200


def test_6e_busy_or_invalid_port_is_one_line(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "best.pt")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert serve.main([str(ckpt), "--port", str(port)]) == 1
        assert one_error_line(capsys.readouterr().err, "serve.py").startswith(f"serve.py: error: port {port} is in use")
    assert serve.main([str(ckpt), "--port", "70000"]) == 1
    assert "port 70000 is not a valid port number" in one_error_line(capsys.readouterr().err, "serve.py")


def load_test(explainer, tmp_path, requests: int, patients: int = 8, workers: int = 4) -> dict:
    """`requests` uploads of `patients` distinct patients, `workers` at a time, on 127.0.0.1; every answer is
    compared with that patient's page made single-threaded (same server, one request at a time)."""
    photos = [patient_photos(k, tmp_path) for k in range(patients)]
    with Server(explainer) as srv:
        reference = []
        for left, right in photos:
            status, page = post(srv.port, {"left": left, "right": right})
            assert status == 200
            reference.append(body_of(page))
        assert len(set(reference)) == patients  # distinct pages: a mix-up would show

        def one(i):
            status, page = post(srv.port, {"left": photos[i % patients][0], "right": photos[i % patients][1]})
            return i, status, page

        t0 = time.perf_counter()
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(one, range(requests)))
        seconds = time.perf_counter() - t0
    statuses = [s for _, s, _ in results]
    wrong = [i for i, s, page in results if s == 200 and body_of(page) != reference[i % patients]]
    return dict(statuses=statuses, wrong=wrong, seconds=seconds)


def test_3a_concurrent_uploads_each_get_their_own_patients_page(explainer, tmp_path):
    result = load_test(explainer, tmp_path, requests=40)
    print(f"serve.py load test: 40 requests, 4 at a time, in {result['seconds']:.1f} s")
    assert result["statuses"] == [200] * 40 and result["wrong"] == []


@pytest.mark.slow
def test_3b_load_test_200_requests_4_at_a_time(explainer, tmp_path):
    result = load_test(explainer, tmp_path, requests=200)
    print(f"serve.py load test: 200 requests, 4 at a time, in {result['seconds']:.1f} s")
    assert result["statuses"] == [200] * 200 and result["wrong"] == []


# ----------------------------------------------------------------------------------------------- 4 report names


def test_4_report_file_names_are_unique_per_patient(tmp_path):
    from odir_dual.deploy.report import write_folder_report

    ids = ["7 x", "7.x", "7_x"]
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    rows, table = [], []
    for pid, colour in zip(ids, colours):
        paths = {}
        for eye in ("left", "right"):
            paths[eye] = tmp_path / "prep" / f"{len(table)}_{eye}.jpg"
            paths[eye].parent.mkdir(exist_ok=True)
            Image.new("RGB", (64, 64), colour).save(paths[eye])
        rows.append({"ID": pid, **{f"p_{c}": 0.1 for c in "NDGCAHMO"}, **{f"pred_{c}": 0 for c in "NDGCAHMO"},
                     "labels": "", "status": "ok"})
        table.append({"id": pid, "left_prepared": str(paths["left"]), "right_prepared": str(paths["right"])})
    scored = {"frame": pd.DataFrame(rows, dtype=object), "table": pd.DataFrame(table), "metrics": None}
    page = write_folder_report(scored, tmp_path / "rep", [0.5] * 8).read_text()
    for pid, colour in zip(ids, colours):
        row = re.search(rf"<tr id='patient-{re.escape(pid)}'>(.*?)</tr>", page, re.S)[1]
        srcs = re.findall(r"src='([^']+)'", row)
        assert len(srcs) == 2
        for src in srcs:
            pixel = np.asarray(Image.open(tmp_path / "rep" / src))[32, 32]
            assert np.abs(pixel.astype(int) - colour).max() < 30, (pid, src)  # its own photographs


# ----------------------------------------------------------------------------------------------- 5 images


def test_5_elongated_images_leave_one_eye_out_and_the_run_goes_on(tmp_path):
    strip = np.zeros((40, 7000, 3), np.uint8)
    strip[:, :, 0] = 200
    Image.fromarray(strip).save(tmp_path / "strip.jpg", quality=90)  # 7000x40 JPEG, a few KB
    Image.fromarray(np.full((2, 200000), 200, np.uint8)).save(tmp_path / "line.png")  # 200000x2 PNG
    good = fundus(tmp_path / "good.jpg", 3)
    paths = [tmp_path / "strip.jpg", tmp_path / "line.png", good]
    prepared, reasons = prepare_paths(paths, tmp_path / "c", 384, workers=1, progress=False)
    assert prepared[2] is not None and reasons[2] is None  # the run went on
    assert prepared[:2] == [None, None]
    assert all(r.startswith("not a fundus photograph (fundus region") for r in reasons[:2]), reasons


def test_5b_an_encoder_failure_is_the_images_problem_not_the_caches(tmp_path, monkeypatch):
    real = Image.Image.save

    def failing(img, fp, *a, **kw):
        if isinstance(fp, io.BytesIO):
            raise ValueError("encoder error -2")
        return real(img, fp, *a, **kw)

    monkeypatch.setattr(Image.Image, "save", failing)
    prepared, reasons = prepare_paths([fundus(tmp_path / "a.jpg", 1)], tmp_path / "c", 64, workers=1, progress=False)
    assert prepared == [None] and reasons == ["cannot be prepared: ValueError: encoder error -2"]


def test_5c_a_fifo_eye_is_not_a_regular_file(tmp_path):
    folder = pair_folder(tmp_path / "images", [1, 2])
    (folder / "2_left.jpg").unlink()
    os.mkfifo(folder / "2_left.jpg")
    table = prepare_pairs(find_pairs(folder).table, tmp_path / "c", 64, workers=1, progress=False)
    status = dict(zip(table["id"], table["status"]))
    assert status == {"1": "ok", "2": "left eye: not a regular file (2_left.jpg)"}


def test_5d_a_symlink_loop_skips_one_entry_not_the_folder(tmp_path):
    folder = pair_folder(tmp_path / "images", [1])
    (folder / "loop_a").symlink_to(folder / "loop_b")
    (folder / "loop_b").symlink_to(folder / "loop_a")
    found = find_pairs(folder)
    table, ignored = found.table, found.ignored
    assert list(table["status"]) == ["ok"]
    assert ("loop_a", "cannot be read: Too many levels of symbolic links") in ignored
    df = small()  # an ODIR folder with a loop beside its sheet and images
    sheet = make_dataset(tmp_path / "d", df, sheet="labels.csv", images="imgs")
    (tmp_path / "d" / "loop").symlink_to(tmp_path / "d" / "loop")
    patients, _ = read_patients(tmp_path / "d")
    assert len(patients) == len(df)


# ----------------------------------------------------------------------------------------------- 7 model card


def test_7_model_card_uses_only_the_report_of_the_same_checkpoint(tmp_path):
    ckpt_path = make_checkpoint(tmp_path / "run" / "best.pt", seed=1)
    ckpt = checkpoint.read_checkpoint(ckpt_path)
    figures = {"patients": 9, "tuned": {"f1_macro": 0.777, "f1": {c: 0.777 for c in "NDGCAHMO"}}}
    report = {"data": {"folder": "x"}, "test": figures,
              "checkpoint": {"file": "best.pt", "epoch": ckpt["epoch"], "weights": checkpoint.weights_digest(
                  ckpt["model"])}}
    (tmp_path / "run" / "report.json").write_text(json.dumps(report))
    card = modelcard.write_model_card(tmp_path / "m.onnx", ckpt, ckpt_path, precision="fp32", log=lambda *a: None)
    assert "Figures on the test split (9 patients)" in card.read_text()
    newer = make_checkpoint(tmp_path / "run" / "best.pt", seed=2)  # a resumed run wrote a better best.pt...
    payload = torch.load(newer, weights_only=True)  # ...and was interrupted before its final report
    payload["val_metrics"] = {"tuned": {"f1_macro": 0.555, "f1": {c: 0.555 for c in "NDGCAHMO"}}}
    checkpoint.save_checkpoint(payload, newer)
    ckpt = checkpoint.read_checkpoint(newer)
    card = modelcard.write_model_card(tmp_path / "m.onnx", ckpt, newer, precision="fp32", log=lambda *a: None)
    text = card.read_text()
    assert "0.777" not in text and "Figures on the validation split" in text and "0.555" in text
    assert "optimistic" in text and "report.json is of another checkpoint" in text
    del report["checkpoint"]  # a report.json from before this check
    (tmp_path / "run" / "report.json").write_text(json.dumps(report))
    card = modelcard.write_model_card(tmp_path / "m.onnx", ckpt, newer, precision="fp32", log=lambda *a: None)
    assert "0.777" not in card.read_text() and "names no checkpoint" in card.read_text()


def test_7b_final_report_names_its_checkpoint(tmp_path):
    from types import SimpleNamespace

    ckpt = checkpoint.read_checkpoint(make_checkpoint(tmp_path / "best.pt", seed=3))
    rng = np.random.default_rng(0)
    val = pd.DataFrame({"id": range(12), **{c: rng.integers(0, 2, 12) for c in "NDGCAHMO"}})
    run = SimpleNamespace(run_dir=tmp_path, cfg=SimpleNamespace(data="x", seed=0), started=0.0, resume_dir=None)
    from odir_dual.training.evaluation import final_report

    report = final_report(run, ckpt, {"validation": val}, {"validation": rng.normal(size=(12, 8))},
                          rng.integers(0, 2, (30, 8)))
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["checkpoint"] == report["checkpoint"] == {
        "file": "best.pt", "epoch": 1, "weights": checkpoint.weights_digest(ckpt["model"])}


# ----------------------------------------------------------------------------------------------- and: score.py


def test_8a_non_finite_or_out_of_range_outputs_are_never_ok(tiny_onnx, tmp_path, monkeypatch, capsys):
    folder = pair_folder(tmp_path / "images", [1, 2, 3])
    real = runtime.OrtRunner.__call__

    def damaged(runner, left, right):
        p, eye_probs = real(runner, left, right)
        p = p.copy()
        p[0, 2] = np.nan
        p[1, 0] = 1.5
        return p, eye_probs

    monkeypatch.setattr(runtime.OrtRunner, "__call__", damaged)
    out = tmp_path / "p.csv"
    assert score.main([str(tiny_onnx["path"]), str(folder), "-o", str(out), "--cache-dir", str(tmp_path / "c"),
                       "--workers", "1"]) == 0
    rows = {r["ID"]: r for r in read_csv(out)}
    assert rows["1"]["status"] == "model output not finite (NaN or infinite probability)" and rows["1"]["p_N"] == ""
    assert rows["2"]["status"] == "model output outside [0, 1]" and rows["2"]["p_N"] == ""
    assert rows["3"]["status"].startswith("ok") and float(rows["3"]["p_N"]) <= 1
    assert "scored 1 of 3 patients" in capsys.readouterr().out


def test_8b_huge_img_px_is_refused_before_any_work(tiny_onnx, tmp_path, capsys):
    _, meta, _ = runtime.load_session(tiny_onnx["path"], "cpu")
    model = onnx_model(tmp_path / "huge.onnx", {**meta["raw"], "img_px": "20000"}, img_px=20000)
    folder = pair_folder(tmp_path / "images", [1])
    assert score.main([str(model), str(folder), "-o", str(tmp_path / "p.csv"), "--cache-dir",
                       str(tmp_path / "c")]) == EXIT_BAD_INPUT
    assert "img_px 20000 / prepare_px" in one_error_line(capsys.readouterr().err, "score.py")
    assert not (tmp_path / "c").exists()
    ckpt = make_checkpoint(tmp_path / "run" / "best.pt")
    payload = torch.load(ckpt, weights_only=True)
    payload["img_px"] = payload["config"]["img_px"] = 20000
    checkpoint.save_checkpoint(payload, ckpt)
    assert export.main([str(ckpt), "-o", str(tmp_path / "huge-export.onnx")]) == EXIT_BAD_INPUT
    assert "img_px 20000; at most 2048 px" in one_error_line(capsys.readouterr().err, "export.py")


# ----------------------------------------------------------------------------------------------- and: one line


def test_8c_damaged_last_pt_on_resume_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    make_checkpoint(run / "last.pt")
    data = (run / "last.pt").read_bytes()
    (run / "last.pt").write_bytes(data[: len(data) // 2])  # a disk that filled up, a copy cut short
    assert train.cli(["--resume", str(run)]) == EXIT_BAD_INPUT
    assert f"{run / 'last.pt'}: not a PyTorch checkpoint" in one_error_line(capsys.readouterr().err, "train.py")


def test_8d_yaml_python_tags_are_refused_in_one_line(tmp_path, capsys):
    pytest.importorskip("yaml")
    marker = tmp_path / "ran"
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(f"img_px: !!python/object/apply:os.system ['touch {marker}']\n")
    assert train.cli(["--config", str(cfg), "--dry-run"]) == EXIT_BAD_INPUT
    message = one_error_line(capsys.readouterr().err, "train.py")
    assert message.startswith(f"train.py: error: --config {cfg}: not a plain YAML mapping")
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------- and: sheets


def csv_text(df: pd.DataFrame, sep: str = ",") -> str:
    return df.to_csv(index=False, sep=sep)


@pytest.mark.parametrize("case, message", [
    ("semicolons", r"its columns are separated by semicolons \(;\), not commas: save it as CSV with commas"),
    ("latin-1", r"row 3: not UTF-8 text \(byte 0xe9; probably Latin-1 or Windows-1252"),
    ("utf-16", r"is UTF-16 text .*save it as 'CSV UTF-8"),
    ("header only", r"has the header row but no patient rows")])
def test_8e_csv_sheets_saved_the_wrong_way_say_so(tmp_path, case, message):
    df = small()
    for side in ("Left", "Right"):  # Latin-1 has no full-width comma: plain keywords, one with an accent
        df[f"{side}-Diagnostic Keywords"] = ["cataract", "caf\u00e9 spots", "normal fundus"]
    sheet = make_dataset(tmp_path / "d", df, sheet="full_df.csv", images="preprocessed_images")
    text = csv_text(df.iloc[:0] if case == "header only" else df, ";" if case == "semicolons" else ",")
    sheet.write_bytes(text.encode({"latin-1": "latin-1", "utf-16": "utf-16"}.get(case, "utf-8")))
    with pytest.raises(SheetError, match=re.escape(str(sheet)) + ": " + message):
        read_patients(tmp_path / "d")


def test_8f_semicolon_sheet_in_an_unknown_layout_is_named(tmp_path):
    df = small()
    make_dataset(tmp_path / "d", df, sheet="labels.csv", images="imgs")
    (tmp_path / "d" / "labels.csv").write_text(csv_text(df, ";"))
    with pytest.raises(FileNotFoundError, match=r"labels\.csv: its columns are separated by semicolons"):
        read_patients(tmp_path / "d")


def test_8g_hidden_first_worksheet_and_uncalculated_formulas(tmp_path):
    import openpyxl

    df = small()
    sheet = make_dataset(tmp_path / "d", df)
    wb = openpyxl.load_workbook(sheet)
    hidden = wb.create_sheet("old notes", 0)
    hidden["A1"] = "scratch"
    hidden.sheet_state = "hidden"
    wb.save(sheet)
    with pytest.raises(SheetError, match=r"first worksheet 'old notes' is hidden.*unhide it, or delete it or move "
                                         r"it after the patient worksheet \('Sheet1'\)"):
        read_patients(tmp_path / "d")
    wb = openpyxl.load_workbook(sheet)
    del wb["old notes"]
    ws = wb.worksheets[0]
    header = [c.value for c in ws[1]]
    ws.cell(row=3, column=header.index("D") + 1).value = "=1-0"  # never calculated: openpyxl saves no value
    wb.save(sheet)
    with pytest.raises(SheetError, match=r"row 3, column 'D': a formula \(=1-0\) with no saved value: open the "
                                         r"workbook in Excel or LibreOffice and save it"):
        read_patients(tmp_path / "d")

"""One patient in a browser: upload the two fundus photographs, see the 8 probabilities and the heatmaps.

    python serve.py runs/NAME                    then open http://127.0.0.1:8000
    python serve.py runs/NAME --port 8080        (--host 0.0.0.0 only if other machines must reach it)

Listens on 127.0.0.1 unless --host says otherwise. Uses the run's best.pt (a --folds run: the fold ensemble, as
export.py writes it) on the CPU (heatmaps need gradients, which ONNX has not): the photographs are prepared as in
training, then the page shows the calibrated probabilities against the run's thresholds, the Grad-CAM of every
predicted class on both eyes, where each eye attends in the other, and links to download the result (JSON, CSV). A
model trained with the per-eye head also shows each eye's findings under its photographs (and in the download).
Nothing is stored. Every page names the model and says it is for research use; a model trained on the synthetic demo
set gets a loud warning.

Limits: uploads up to 64 MB with a valid Content-Length, photographs up to 40 MP (checked before decoding), 4 requests
at work at a time (others wait 2 s, then 503), 30 s socket timeouts, one upload explained at a time.
"""
from __future__ import annotations

import base64
import errno
import html
import io
import json
import contextlib
import re
import sys
import tempfile
import threading
import time
import warnings
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from odir_dual.common.cli import ArgParser
from odir_dual.common.errors import OdirError
from odir_dual.model.eyes import eye_findings, findings
from odir_dual.pipeline import prepare
from odir_dual.pipeline.constants import CLASS_NAMES, CLASSES, EYES
from odir_dual.pipeline.prepare import BadImage
from odir_dual.pipeline.split import load_split
from odir_dual.pipeline.synthetic import is_synthetic
from odir_dual.deploy.report import CSS, Explainer, colour_strip, overlay, untrusted_html
from odir_dual.model.trust import quality_text

MAX_UPLOAD_BYTES = 64 << 20  # two photographs; ODIR originals are 0.5-5 MB each
MAX_IMAGE_PIXELS = 40_000_000  # per photograph (ODIR originals: up to ~14 MP); checked in the header, before decoding
MAX_CONCURRENT = 4  # requests at work at a time: bounds memory (each holds its upload and decoded images)
QUEUE_WAIT_S = 2.0  # how long a request waits for a free slot before 503
SOCKET_TIMEOUT_S = 30.0  # per blocking read/write on a connection: a stalled client frees its thread
# The whole request head and body must arrive within this: a client that sends a byte now and then (each read
# within SOCKET_TIMEOUT_S) would otherwise hold its thread for as long as it likes. 64 MB at 50 Mbit/s takes 10 s.
REQUEST_DEADLINE_S = 15.0
MAX_CONNECTIONS = 8  # open connections (each one thread), at work or still sending: more are answered 503 at once
FORM = """<form method=post action=/ enctype=multipart/form-data>
<p>Left eye: <input type=file name=left accept=image/*> Right eye: <input type=file name=right accept=image/*>
<input type=submit value=Explain></p></form>"""
DISEASE = {c: name[0].upper() + name[1:] for c, name in CLASS_NAMES.items()}  # "Normal", ..., "AMD", "Other"
STYLE = """.ident{background:#f3f6fa;border:1px solid #c8d3e0;padding:.4em .8em;font-size:14px}
.synthetic{background:#b00020;color:#fff;font-size:18px;font-weight:bold;padding:.8em 1em;margin:.6em 0}
.note{color:#555;font-size:13px}a.download{margin-right:1em}figure.scale{vertical-align:bottom}
p.found{font-size:15px;margin:.2em 0 .8em;background:#fff4d6;padding:.3em .6em;display:inline-block}"""


def model_identity(run, explainer: Explainer) -> dict:
    """What the page says about the model: run name, backbone, training data folder and patients, commit, and
    whether it was trained on the synthetic demo set (modelcard's test)."""
    folder = Path(run) if Path(run).is_dir() else Path(run).parent
    cfg = explainer.config
    patients = ""
    folds = getattr(explainer, "folds", None)
    try:
        parts = load_split(folder / ("fold-1/split.csv" if folds else "split.csv"))
        patients = (f"{sum(map(len, parts))} patients (the mean of {folds} fold models, which trained on the "
                    f"{len(parts[0]) + len(parts[1])} outside the test split; test {len(parts[2])})" if folds else
                    f"{sum(map(len, parts))} patients (train {len(parts[0])}, validation {len(parts[1])}, "
                    f"test {len(parts[2])})")
    except (OSError, ValueError):
        pass  # a best.pt copied without its run folder: the page says less
    return {"run": folder.name, "backbone": cfg.get("backbone", "?"), "img_px": explainer.img_px,
            "data": cfg.get("data", ""), "patients": patients, "preset": cfg.get("preset", ""),
            "commit": getattr(explainer, "commit", "") or "unknown", "synthetic": is_synthetic(cfg.get("data", "")),
            "quality": getattr(explainer, "quality", {}), "folds": folds}


def identity_html(ident: dict) -> str:
    """The model box at the top of every page, with the research-use note and the synthetic-data warning."""
    out = []
    if ident["synthetic"]:
        out.append("<div class=synthetic>Warning: this model was trained on SYNTHETIC pictures (the built-in demo "
                   "set), not on photographs of patients. Its outputs say nothing about a real eye.</div>")
    data = html.escape(str(ident["data"]) or "unknown") + (f" · {html.escape(ident['patients'])}"
                                                          if ident["patients"] else "")
    out.append(f"<div class=ident>Model: run <b>{html.escape(ident['run'])}</b> · {html.escape(ident['backbone'])} "
               f"at {ident['img_px']} px · preset {html.escape(str(ident['preset']))} · commit "
               f"{html.escape(str(ident['commit']))}<br>Trained on: {data}<br>How good: "
               f"{html.escape(quality_text(ident.get('quality') or {}))}</div>"
               + "".join(untrusted_html((ident.get("quality") or {}).get("untrusted") or {}))
               + "<p class=note>For research use only: not a medical device, not a diagnosis. The probabilities are "
               f"calibrated on the run's {'out-of-fold' if ident.get('folds') else 'validation'} predictions and "
               "compared with the thresholds tuned there.</p>")
    return "".join(out)


def result_links(result: dict) -> str:
    """Download links (JSON and CSV, as data: URIs: nothing is stored on the server) of one result."""
    as_json = json.dumps(result, indent=1)
    eyes = result.get("eyes")
    rows = ["class,name,probability,threshold,predicted" + (",left_probability,right_probability,eye_threshold,"
                                                            "left_found,right_found" if eyes else "")] + [
        f"{c},{DISEASE[c]},{result['probabilities'][c]:.6f},{result['thresholds'][c]:.4f},"
        f"{int(c in result['predicted'])}"
        + ("".join(f",{eyes[e]['probabilities'][c]:.6f}" for e in EYES) + f",{eyes['thresholds'][c]:.4f}"
           + "".join(f",{int(c in eyes[e]['found'])}" for e in EYES) if eyes else "") for c in CLASSES]
    uri = lambda text, kind: f"data:{kind};base64," + base64.b64encode(text.encode()).decode()  # noqa: E731
    return (f"<p><a class=download download='odir-result.json' href='{uri(as_json, 'application/json')}'>Download "
            f"the result (JSON)</a><a class=download download='odir-result.csv' "
            f"href='{uri(chr(10).join(rows) + chr(10), 'text/csv')}'>Download the result (CSV)</a></p>")


def eye_result(eye_probs, eye_thresholds) -> dict:
    """The download's per-eye part: findings in words, and per eye its probabilities and classes found."""
    eye_pred = np.asarray(eye_probs) > np.asarray(eye_thresholds)  # (2, K)
    per_eye = {e: {"probabilities": {c: round(float(p), 6) for c, p in zip(CLASSES, eye_probs[i])},
                   "found": [c for c, on in zip(CLASSES, eye_pred[i]) if on]} for i, e in enumerate(EYES)}
    return {"findings": findings(eye_pred),
            "eyes": {"thresholds": {c: round(float(t), 6) for c, t in zip(CLASSES, eye_thresholds)}, **per_eye}}


def parse_upload(content_type: str, body: bytes) -> dict[str, bytes]:
    """multipart/form-data → {field name: file bytes} (the email package: the cgi module is gone in Python 3.13)."""
    return {name: data for name, (_, data) in parse_upload_files(content_type, body).items()}


def parse_upload_files(content_type: str, body: bytes) -> dict[str, tuple[str, bytes]]:
    """multipart/form-data → {field name: (the file's name as uploaded, its bytes)}."""
    msg = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    if not msg.is_multipart():
        raise ValueError("expected a multipart/form-data upload")
    return {part.get_param("name", header="content-disposition"): (part.get_filename() or "",
                                                                   part.get_payload(decode=True) or b"")
            for part in msg.iter_parts()}


def _png_uri(pixels: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def check_pixels(eye: str, data: bytes, limit: int = MAX_IMAGE_PIXELS) -> None:
    """Refuse a photograph whose header declares more than `limit` pixels, before it is decoded (a 518 KB PNG can
    declare 600 MP: 1.65 GB once decoded). Raises BadImage naming the eye."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:  # reads the header only
                w, h = im.size
    except UnidentifiedImageError:
        raise BadImage(f"{eye} eye: not an image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(f"{eye} eye: too many pixels ({e})") from None
    except Exception as e:  # noqa: BLE001 - any header the decoder refuses is a bad upload, not a server error
        raise BadImage(f"{eye} eye: unreadable image ({type(e).__name__})") from None
    if w * h > limit:
        raise BadImage(f"{eye} eye: {w}x{h} px is more than {limit / 1e6:.0f} MP; send the original photograph")


def explain_upload(explainer: Explainer, left: bytes, right: bytes, lock: threading.Lock | None = None,
                   identity: dict | None = None, names: tuple[str, str] = ("", "")) -> str:
    """The answer page's body for one uploaded pair (raises pipeline.prepare.BadImage naming the eye, e.g.
    "left eye: not an image", for a bad photograph); `identity` (`model_identity`) goes into the download;
    `names`: the uploaded files' names (left, right), shown with each eye.

    `lock`: held while the shared model runs (its Grad-CAM hooks and gradients are per model, not per thread);
    the photographs are checked and prepared outside it, in parallel."""
    with tempfile.TemporaryDirectory(prefix="odir-serve-") as tmp:
        paths = []
        for eye, data in (("left", left), ("right", right)):
            check_pixels(eye, data)
            src, dst = Path(tmp) / f"{eye}_upload", Path(tmp) / f"{eye}.jpg"
            src.write_bytes(data)
            try:
                prepare.prepare_image(src, dst, explainer.config.get("prepare_px") or explainer.img_px)
            except BadImage as e:
                raise BadImage(f"{eye} eye: {e.reason}") from None
            paths.append(str(dst))
        with lock if lock is not None else contextlib.nullcontext():
            probs = explainer.explain([paths[0]], [paths[1]], [[]])[0]["probs"]
            predicted = [k for k, (p, t) in enumerate(zip(probs, explainer.thresholds)) if p > t]
            item = explainer.explain([paths[0]], [paths[1]], [predicted or [int(np.argmax(probs))]])[0]
    cells = "".join(f"<td class=on>{p:.3f}</td>" if p > t else f"<td>{p:.3f}</td>"
                    for p, t in zip(item["probs"], explainer.thresholds))
    result = {"probabilities": {c: round(float(p), 6) for c, p in zip(CLASSES, item["probs"])},
              "thresholds": {c: round(float(t), 6) for c, t in zip(CLASSES, explainer.thresholds)},
              "predicted": [CLASSES[k] for k in predicted], "model": identity or {}}
    found = {}
    if "eye_probs" in item:  # the per-eye head: which eye shows what
        result.update(eye_result(item["eye_probs"], explainer.eye_thresholds))
        found = eye_findings(item["eye_probs"] > np.asarray(explainer.eye_thresholds))
    untrusted = (getattr(explainer, "quality", None) or {}).get("untrusted") or {}
    said = ", ".join(DISEASE[CLASSES[k]] + (" (not to be trusted)" if CLASSES[k] in untrusted else "")
                     for k in predicted) or "nothing above its threshold"
    if 0 in predicted and [k for k in predicted if k and CLASSES[k] not in untrusted]:  # (as score.py's flag)
        said += " (note: Normal means no disease, yet a disease is predicted too: look at this pair closely)"
    out = ["<table id=probs><tr>" + "".join(f"<th>{DISEASE[c]}<br><small>{c} · threshold {t:.2f}"
                                            + ("<br>not to be trusted" if c in untrusted else "") + "</small></th>"
                                            for c, t in zip(CLASSES, explainer.thresholds))
           + f"</tr><tr>{cells}</tr></table>",
           f"<p>Predicted: <b>{html.escape(said)}</b> (probabilities above the class's threshold are highlighted)</p>",
           *([f"<p id=findings>Which eye: <b>{html.escape(result['findings'])}</b> (the per-eye head, each class "
              "above its per-eye threshold; the prediction above is the patient's, the official one)</p>"]
             if found else []),
           result_links(result)]
    attended = {0: item["attention"].get("right_to_left"), 1: item["attention"].get("left_to_right")}  # none: concat head
    scale = (f"<figure class=scale><img src='{_png_uri(colour_strip())}' width=256 height=12><figcaption>0 "
             f"&larr; heatmap weight &rarr; 1 (each map's own maximum)</figcaption></figure>")
    for e, eye in enumerate(("left", "right")):
        view = item["views"][e]
        figures = [("image", view), *((f"Grad-CAM {DISEASE[CLASSES[k]]}", overlay(view, cams[e]))
                                      for k, cams in item["cams"].items()),
                   *([("attended by the other eye", overlay(view, attended[e]))] if attended[e] is not None else [])]
        upload = f" <small>({html.escape(names[e])})</small>" if names[e] else ""
        seen = f"<p class=found id=found-{eye}>Findings in the {eye} eye: <b>{html.escape(found[eye])}</b></p>" \
            if found else ""
        out.append(f"<h2>{eye.capitalize()} eye{upload}</h2><div>" + "".join(
            f"<figure><img src='{_png_uri(px)}' width=256><figcaption>{html.escape(cap)}</figcaption></figure>"
            for cap, px in figures) + scale + f"</div>{seen}")
    return "\n".join(out)


class _DeadlineReader(io.RawIOBase):
    """A connection's reads, each bounded by `timeout_s` and all of them together by a deadline: a TimeoutError
    once it has passed (http.server then drops the connection with one log line)."""

    def __init__(self, sock, timeout_s: float):
        self.sock, self.timeout_s, self.deadline = sock, timeout_s, float("inf")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request head and body took longer than the server's deadline")
        self.sock.settimeout(min(left, self.timeout_s))
        return self.sock.recv_into(buffer)


class BoundedServer(ThreadingHTTPServer):
    """http.server's threading server with a bound on open connections (each holds a thread from accept to close,
    also while it is still sending): past `max_connections`, a new connection gets 503 at once, from the accepting
    thread, and no thread of its own."""

    daemon_threads = True

    def __init__(self, address, handler, max_connections: int = MAX_CONNECTIONS):
        self.open_connections = threading.BoundedSemaphore(max_connections)
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        if not self.open_connections.acquire(blocking=False):
            with contextlib.suppress(OSError):
                request.settimeout(1.0)  # a few bytes into an empty send buffer: never blocks the accepting thread
                request.sendall(b"HTTP/1.0 503 Service Unavailable\r\nRetry-After: 5\r\nContent-Length: 0\r\n"
                                b"Connection: close\r\n\r\n")
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.open_connections.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.open_connections.release()


def make_server(address, explainer: Explainer, title: str, identity: dict | None = None, *,
                max_connections: int = MAX_CONNECTIONS, **limits) -> BoundedServer:
    """The server of one run on `address` (host, port); `limits`: `make_handler`'s."""
    return BoundedServer(address, make_handler(explainer, title, identity, **limits), max_connections)


def make_handler(explainer: Explainer, title: str, identity: dict | None = None, *,
                 max_concurrent: int = MAX_CONCURRENT,
                 queue_wait_s: float = QUEUE_WAIT_S, timeout_s: float = SOCKET_TIMEOUT_S,
                 deadline_s: float = REQUEST_DEADLINE_S, max_upload_bytes: int = MAX_UPLOAD_BYTES):
    """The request handler class of one served run: one lock for the model, one semaphore for the requests;
    `identity` (`model_identity`) is shown on every page. Each request's head and body must arrive within
    `deadline_s`, each read within `timeout_s`."""
    about = identity_html(identity) if identity else ""
    model_lock = threading.Lock()
    slots = threading.BoundedSemaphore(max_concurrent)

    class Handler(BaseHTTPRequestHandler):
        timeout = timeout_s  # socketserver sets it on the connection: every read and write is bounded

        def setup(self):
            super().setup()
            self.reader = _DeadlineReader(self.connection, timeout_s)
            self.rfile = io.BufferedReader(self.reader)

        def handle_one_request(self):
            self.reader.deadline = time.monotonic() + deadline_s  # from the first byte of the request line
            super().handle_one_request()

        def _answer(self, status: int, body: str) -> None:
            page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                    f"<style>{CSS}{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{about}{FORM}{body}"
                    f"</body></html>")
            data = page.encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802 (http.server's naming)
            self._answer(200, "<p>Choose both eyes' photographs of one patient.</p>")

        def _refuse(self, status: int, text: str) -> None:
            """Answer without reading the body, and close the connection (its unread bytes are no next request)."""
            self.close_connection = True
            self._answer(status, f"<p class=bad>{html.escape(text)}</p>")

        def do_POST(self):  # noqa: N802
            length = self.headers.get("Content-Length")
            if length is None or self.headers.get("Transfer-Encoding"):
                return self._refuse(411, "an upload needs a Content-Length (no chunked transfer)")
            if not re.fullmatch(r"[0-9]{1,12}", length.strip()):
                return self._refuse(400, f"Content-Length {length[:40]!r}: expected a non-negative whole number")
            size = int(length)
            if size > max_upload_bytes:
                return self._refuse(413, f"upload of {size} bytes is larger than {max_upload_bytes >> 20} MB")
            if not slots.acquire(timeout=queue_wait_s):
                self.close_connection = True
                self.send_response(503)
                self.send_header("Retry-After", "5")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            try:
                body = self.rfile.read(size)
                self.reader.deadline = float("inf")  # all read: the model's work has no such deadline
                if len(body) < size:
                    return self._refuse(400, f"upload cut short: {len(body)} of {size} bytes")
                files = parse_upload_files(self.headers.get("Content-Type", ""), body)
                del body
                missing = [eye for eye in ("left", "right") if not files.get(eye, ("", b""))[1]]
                if missing:
                    return self._answer(400, f"<p class=bad>no {' or '.join(missing)} eye photograph chosen</p>")
                self._answer(200, explain_upload(explainer, files["left"][1], files["right"][1], model_lock, identity,
                                                 names=(files["left"][0], files["right"][0])))
            except (BadImage, ValueError) as e:
                self._answer(400, f"<p class=bad>{html.escape(str(e))}</p>")
            except OSError:  # the connection: a timeout or a client gone (http.server closes it and logs one line)
                raise
            except Exception as e:  # noqa: BLE001 - any other failure answers 500 instead of a dropped connection
                self.log_error("explaining an upload failed: %s: %s", type(e).__name__, e)
                self._answer(500, "<p class=bad>the server could not explain this upload (see its log)</p>")
            finally:
                slots.release()

    return Handler


def main(argv=None) -> int:
    ap = ArgParser(prog="python serve.py", description=__doc__)
    ap.add_argument("run", help="a run folder of train.py (its best.pt; a --folds run: the fold ensemble), "
                                "or a best.pt")
    net = ap.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    net.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    args = ap.parse_args(argv)
    try:
        explainer = Explainer(args.run)
    except OdirError as e:
        print(f"serve.py: error: {e}", file=sys.stderr)
        return 1
    if not 0 <= args.port <= 65535:
        print(f"serve.py: error: port {args.port} is not a valid port number (0-65535)", file=sys.stderr)
        return 1
    identity = model_identity(args.run, explainer)
    try:
        server = make_server((args.host, args.port), explainer, f"odir-dual · {identity['run']}", identity)
    except OSError as e:  # one line, no traceback: the port is taken, or the address is not this machine's
        why = (f"port {args.port} is in use (choose another with --port)" if e.errno == errno.EADDRINUSE
               else f"cannot listen on {args.host}:{args.port} ({e.strerror or e})")
        print(f"serve.py: error: {why}", file=sys.stderr)
        return 1
    if identity["synthetic"]:
        print("warning: this model was trained on the synthetic demo set, not on photographs of patients")
    print(f"serving {args.run} on http://{args.host}:{server.server_address[1]} (Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

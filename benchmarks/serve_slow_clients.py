"""serve.py under slow clients: how many threads 40 clients sending their request head 1 byte every 1.2 s take.

Starts `python serve.py` (a tiny random-weight checkpoint) on 127.0.0.1 in a subprocess, reads its thread count from
/proc before the clients connect, then every 0.5 s while they send, and reports the count before and the peak. Every
loop is bounded (CLIENT_S); the server is stopped at the end. Linux only (/proc).

    .venv/bin/python benchmarks/serve_slow_clients.py [SERVE_PY [PYTHONPATH]]
    # SERVE_PY: another serve.py to compare (default this checkout's), run with PYTHONPATH (its own package)
"""
from __future__ import annotations

import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CLIENTS = 40
BYTE_EVERY_S = 1.2  # each client sends one byte of its request head this often
CLIENT_S = 30.0  # each client stops after this long, whatever happened
SAMPLE_EVERY_S = 0.5


def tiny_checkpoint(path: Path) -> Path:
    """A best.pt of a tiny random-weight network, as train.py writes it."""
    import numpy as np

    from odir_dual.training import checkpoint, config

    cfg = config.resolve_config({"backbone": "test_convnext", "pretrained": False, "img_px": 64, "embed_dim": 32,
                                 "heads": 8})
    model = checkpoint.build_model(cfg)
    payload = checkpoint.checkpoint_payload(model, cfg, thresholds=np.full(8, 0.5), mean=(0.485, 0.456, 0.406),
                                            std=(0.229, 0.224, 0.225), epoch=1, step=1, best={})
    checkpoint.save_checkpoint(payload, path)
    return path


def threads(pid: int) -> int:
    return int(re.search(r"^Threads:\s+(\d+)", Path(f"/proc/{pid}/status").read_text(), re.MULTILINE)[1])


def slow_client(port: int, stop: threading.Event) -> None:
    head = b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n"
    t_end = time.monotonic() + CLIENT_S
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            for byte in head:
                if stop.is_set() or time.monotonic() > t_end:
                    return
                s.sendall(bytes([byte]))
                stop.wait(BYTE_EVERY_S)
    except OSError:  # refused, reset or closed by the server
        pass


def measure(serve_py: Path, env: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = tiny_checkpoint(Path(tmp) / "best.pt")
        server = subprocess.Popen([sys.executable, str(serve_py), str(ckpt), "--port", "0"], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            line = server.stdout.readline()  # "serving ... on http://127.0.0.1:PORT (Ctrl-C stops)"
            while line and "serving" not in line:
                line = server.stdout.readline()
            port = int(re.search(r":(\d+) ", line)[1])
            time.sleep(1.0)
            before = threads(server.pid)
            stop = threading.Event()
            clients = [threading.Thread(target=slow_client, args=(port, stop)) for _ in range(CLIENTS)]
            for c in clients:
                c.start()
            peak, t0 = before, time.monotonic()
            while time.monotonic() - t0 < CLIENT_S:
                peak = max(peak, threads(server.pid))
                time.sleep(SAMPLE_EVERY_S)
            stop.set()
            for c in clients:
                c.join(10)
            return {"before": before, "peak": peak}
        finally:
            server.terminate()
            server.wait(30)


def main() -> None:
    import os

    serve_py = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "serve.py"
    env = dict(os.environ)
    if len(sys.argv) > 2:
        env["PYTHONPATH"] = sys.argv[2]
    result = measure(serve_py, env)
    print(f"{serve_py}: {CLIENTS} clients sending 1 byte every {BYTE_EVERY_S} s on 127.0.0.1: server threads "
          f"{result['before']} before, peak {result['peak']} during {CLIENT_S:.0f} s")


if __name__ == "__main__":
    main()

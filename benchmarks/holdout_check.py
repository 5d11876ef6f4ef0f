"""A run's test patients scored as a user scores new patients, against the run's own test report.

Exports RUN/best.pt (unless RUN/best.onnx exists), builds an ODIR folder holding only the run's test patients
(their sheet rows and links to their images: `pipeline.odir.subset_folder`), runs `score.py` on it as a separate
process, and prints the official ODIR score and the per-class figures from score.py's predictions beside those of
RUN/report.json. They must agree to 3 decimals (same patients, same preprocessing, ONNX vs PyTorch).

    .venv/bin/python benchmarks/holdout_check.py runs/NAME [--out /tmp/holdout]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import ROOT  # noqa: E402
from odir_dual.model.metrics import evaluate  # noqa: E402
from odir_dual.pipeline.constants import CLASSES  # noqa: E402
from odir_dual.pipeline.odir import read_patients, subset_folder  # noqa: E402
from odir_dual.pipeline.split import load_split  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a finished run folder (report.json, split.csv, best.pt)")
    ap.add_argument("--out", default="/tmp/odir-holdout", help="where the holdout folder and the CSV go (replaced)")
    args = ap.parse_args(argv)
    run, out = Path(args.run), Path(args.out)
    report = json.loads((run / "report.json").read_text())
    if "test" not in report:
        raise SystemExit(f"{run}: no test split (--test-fraction 0): nothing to check")
    onnx = run / "best.onnx"
    if not onnx.is_file():
        subprocess.run([sys.executable, "export.py", str(run)], cwd=ROOT, check=True)
    shutil.rmtree(out, ignore_errors=True)
    _, _, test_ids = load_split(run / "split.csv")
    folder = subset_folder(report["config"]["data"], test_ids, out / "patients")
    csv = out / "predictions.csv"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "score.py", str(onnx), str(folder), "-o", str(csv)], cwd=ROOT, check=True)
    print(f"score.py on {len(test_ids)} held-out patients: {time.perf_counter() - t0:.1f} s (preparation included)")

    scored = pd.read_csv(csv).sort_values("ID")
    truth = read_patients(folder)[0].set_index("id").loc[scored["ID"]]
    y, probs = truth[list(CLASSES)].to_numpy(int), scored[[f"p_{c}" for c in CLASSES]].to_numpy(float)
    thresholds = np.array([report["thresholds"][c] for c in CLASSES])
    ours = evaluate(y, probs, thresholds)
    theirs = report["test"]
    rows = [("official final", ours["odir"]["final"], theirs["odir"]["final"]),
            ("kappa", ours["odir"]["kappa"], theirs["odir"]["kappa"]),
            ("F1 (flattened)", ours["odir"]["f1"], theirs["odir"]["f1"]),
            ("AUC (pooled)", ours["odir"]["auc"], theirs["odir"]["auc"]),
            ("AUC macro", ours["at_0.5"]["auc_macro"], theirs["at_0.5"]["auc_macro"]),
            ("F1 macro, tuned thresholds", ours["tuned"]["f1_macro"], theirs["tuned"]["f1_macro"]),
            *((f"F1 {c}, tuned", ours["tuned"]["f1"][c], theirs["tuned"]["f1"][c]) for c in CLASSES),
            *((f"AUC {c}", ours["at_0.5"]["auc"][c], theirs["at_0.5"]["auc"][c]) for c in CLASSES)]
    print(f"\n{'figure':<28} {'score.py (ONNX)':>16} {'report.json':>12}  same to 3 decimals")
    same = True
    for name, a, b in rows:
        ok = round(a, 3) == round(b, 3)
        same &= ok
        print(f"{name:<28} {a:16.3f} {b:12.3f}  {'yes' if ok else 'NO'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

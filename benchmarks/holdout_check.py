"""A run's test patients scored as a user scores new patients, against the run's own test report.

Exports RUN/best.pt (unless RUN/best.onnx exists), builds an ODIR folder holding only the run's test patients
(their sheet rows and links to their images: `pipeline.odir.subset_folder`), runs `score.py` on it as a separate
process, and prints the official ODIR score and the per-class figures from score.py's predictions beside those of
RUN/report.json (a --folds run: its fold ensemble, exported as one graph). They must agree to 3 decimals (same
patients, same preprocessing, ONNX vs PyTorch). A model with the per-eye head adds the per-eye AUC per class (report.json's "eyes"), and prints the `findings` of a few scored
patients beside their sheet's Left/Right-Diagnostic Keywords, to be read by a person (--findings N, default 5).

    .venv/bin/python benchmarks/holdout_check.py runs/NAME [--out /tmp/holdout] [--findings 5]
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
from odir_dual.model.eyes import eye_figures, eye_findings  # noqa: E402
from odir_dual.model.metrics import evaluate  # noqa: E402
from odir_dual.pipeline.constants import CLASSES, EYES  # noqa: E402
from odir_dual.pipeline.keywords import eye_label_matrix  # noqa: E402
from odir_dual.pipeline.odir import read_patients, subset_folder  # noqa: E402
from odir_dual.pipeline.split import load_split  # noqa: E402
from odir_dual.training.ensemble import is_fold_run  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a finished run folder (report.json, split.csv, best.pt)")
    ap.add_argument("--out", default="/tmp/odir-holdout", help="where the holdout folder and the CSV go (replaced)")
    ap.add_argument("--findings", type=int, default=5, help="patients whose per-eye findings are printed beside their "
                                                            "keywords (a model with the per-eye head)")
    args = ap.parse_args(argv)
    run, out = Path(args.run), Path(args.out)
    report = json.loads((run / "report.json").read_text())
    if "test" not in report:
        raise SystemExit(f"{run}: no test split (--test-fraction 0): nothing to check")
    onnx = run / "best.onnx"
    if not onnx.is_file():
        subprocess.run([sys.executable, "export.py", str(run)], cwd=ROOT, check=True)
    shutil.rmtree(out, ignore_errors=True)
    # a --folds run (its ONNX: the fold ensemble) has one split.csv per fold, each with the same test patients
    _, _, test_ids = load_split(run / ("fold-1/split.csv" if is_fold_run(run) else "split.csv"))
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
    eyes = "findings" in scored.columns and theirs.get("eyes", {}).get("model")
    if eyes:  # the per-eye head: its AUC per class on the same eyes
        eye_thr = np.array([report["eye_thresholds"][c] for c in CLASSES])
        eye_probs = scored[[f"{e}_p_{c}" for e in EYES for c in CLASSES]].to_numpy(float).reshape(-1, 2, 8)
        mine = eye_figures(*eye_label_matrix(truth), eye_probs, eye_thr, probs, thresholds)["model"]
        rows += [(f"per-eye AUC {c}", mine["auc"][c], theirs["eyes"]["model"]["auc"][c]) for c in CLASSES]
    print(f"\n{'figure':<28} {'score.py (ONNX)':>16} {'report.json':>12}  same to 3 decimals")
    same = True
    for name, a, b in rows:
        ok = round(a, 3) == round(b, 3)
        same &= ok
        print(f"{name:<28} {a:16.3f} {b:12.3f}  {'yes' if ok else 'NO'}")
    if eyes and args.findings:
        print("\n".join(findings_beside_keywords(scored.set_index("ID"), truth, eye_thr, args.findings)))
    return 0 if same else 1


def findings_beside_keywords(scored, truth, eye_thresholds, n: int) -> list[str]:
    """For n patients (those whose two eyes' keywords differ first, then by ID): the patient labels and the
    `findings` score.py wrote, then per eye the sheet's keywords beside the findings of that eye."""
    differ = truth["left_keywords"].astype(str) != truth["right_keywords"].astype(str)
    ids = list(truth.index[differ]) + list(truth.index[~differ])
    lines = [f"\nper-eye findings of {min(n, len(ids))} patients beside their sheet's keywords (read them: does each "
             "eye's finding name what its keywords say?)"]
    for pid in ids[:n]:
        r, t = scored.loc[pid], truth.loc[pid]
        probs = np.array([[r[f"{e}_p_{c}"] for c in CLASSES] for e in EYES], float)
        found = eye_findings(probs > eye_thresholds)
        true = ",".join(c for c in CLASSES if t[c] == 1)
        labels = r["labels"] if isinstance(r["labels"], str) else "-"  # a blank cell reads back as NaN
        lines.append(f"patient {pid}: labels {labels} (sheet {true}) · findings: {r['findings']}")
        said = eye_findings(eye_label_matrix(truth.loc[[pid]])[0][0] > 0.5)  # the keywords as the loss reads them
        lines += [f"  {e:<5} keywords: {t[f'{e}_keywords']!s} [{said[e]}]\n  {'':<5} findings: {found[e]}"
                  for e in EYES]
    return lines


if __name__ == "__main__":
    sys.exit(main())

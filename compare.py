"""Compare two models on the same patients: every figure of both, and the paired difference B − A with its 95 %
bootstrap interval (the same resamples of the patients for both, seeded); * marks a difference whose interval
excludes zero.

    python compare.py RUN_A RUN_B           # their test predictions (predictions_test.csv)
    python compare.py RUN_A RUN_B --oof     # two --folds runs: their out-of-fold predictions (predictions_oof.csv)
    python compare.py A.csv B.csv           # predictions CSVs on the same patients: a run's, or score.py's output on
                                            # a folder with its sheet (true_labels)

Figures: the official ODIR-2019 final, kappa, F1 and AUC (threshold 0.5 on the calibrated probabilities), the AUC
macro and each class's AUC. Runs or files whose patients (or labels) differ are refused: a paired comparison needs
the same patients.
"""
from __future__ import annotations

import argparse
import sys

from odir_dual.common.cli import ArgParser, run_cli
from odir_dual.deploy.compare import compare, format_comparison, read_predictions
from odir_dual.model.metrics import BOOTSTRAP_RESAMPLES


def main(argv=None) -> int:
    ap = ArgParser(prog="python compare.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", metavar="RUN_A", help="a run folder, or a predictions CSV")
    ap.add_argument("b", metavar="RUN_B", help="a run folder, or a predictions CSV on the same patients")
    ap.add_argument("--oof", action="store_true", help="run folders: their out-of-fold predictions (--folds runs) "
                                                       "instead of the test split's")
    ap.add_argument("--resamples", type=int, default=BOOTSTRAP_RESAMPLES,
                    help=f"bootstrap resamples (default {BOOTSTRAP_RESAMPLES})")
    ap.add_argument("--seed", type=int, default=0, help="the resamples' seed (default 0)")
    args = ap.parse_args(argv)
    if args.resamples < 100:
        ap.error("--resamples: at least 100 for a 95 % interval")

    def run() -> int:
        a, b = read_predictions(args.a, args.oof), read_predictions(args.b, args.oof)
        print(format_comparison(compare(a, b, resamples=args.resamples, seed=args.seed), str(a.source),
                                str(b.source)))
        return 0

    return run_cli(run, "compare.py")


if __name__ == "__main__":
    sys.exit(main())

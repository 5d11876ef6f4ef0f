"""Which training recipe works on real photographs: one factor at a time, several seeds, test figures.

Each row is `python train.py --data FOLDER --preset cpu` plus the row's flags, run once per seed (the seed also
draws the train/validation/test split). Every figure comes from the run's own report.json: the test patients, scored
once with the best checkpoint (calibrated, thresholds tuned on validation), beside the trivial predictor on the same
patients. The table shows the mean and the spread (max - min) over seeds, and each row's difference to the base row.
A run folder that already holds a report.json is read back instead of trained again (delete it to rerun).

    .venv/bin/python benchmarks/recipe_ablation.py                      # real ODIR subset, the settings below
    .venv/bin/python benchmarks/recipe_ablation.py --rows base,no_ema --seeds 1,2,3 --extra "--epochs 6"
"""
from __future__ import annotations

import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import ROOT, header, print_header, real_odir, write_results  # noqa: E402


@dataclass
class Settings:
    rows: str = "all"  # comma list of ROWS keys, or all
    seeds: str = "1,2"  # one run per seed per row
    # flags added to every run: none trains the preset as it is (14 epochs at 128 px, ~14 min a run two at a time on
    # 2 idle cores); "--epochs 6" is round 2's cheaper screening size
    extra: str = ""
    out: str = "/tmp/odir-ablation"  # run folders (one per row and seed)
    # runs at a time, each with one torch thread and one DALI thread: on 2 cores two small single-threaded runs
    # finish sooner than one after the other with 2 threads each (less thread oversubscription)
    parallel: int = 2
    cache_dir: str = ""  # prepared images; default: the project cache
    collect: bool = False  # only read back the runs already finished in `out` (one table of several sessions)
    results: str = "recipe_ablation_round4"  # benchmarks/results/NAME.json (rounds run on different presets keep apart)


# Round 4 (issue 18): the cpu preset on ImageNet features (EfficientNet-Lite0 from its PyPI package). Rows were
# screened at `--extra "--img-px 128 --epochs 3"` (a tenth of the preset's compute) on 2 seeds, one factor at a time
# against the candidate (the preset with the backbone at 0.3× the head's learning rate). Round 3's rows (from-scratch
# test_resnet) are in benchmarks/results/recipe_ablation_round3.json (commit 76065f4).
LR03 = " --backbone-lr-mult 0.3"
ROWS = {  # key: (what changes, train.py flags on top of the cpu preset)
    "base": ("candidate: lite0, 2 stages frozen, per-eye ×2, EMA, backbone lr 0.3×", LR03.strip()),
    "no_eye": ("− per-eye loss", "--eye-loss-weight 0" + LR03),
    "contrast": ("+ local contrast 1/60 (round 3's first layer)", "--local-contrast 0.0167" + LR03),
    "no_freeze": ("− freezing (the whole backbone trained)", "--freeze-stages 0" + LR03),
    "bce": ("plain BCE (no focal term, no positive weights)", "--focal-weight 0 --no-bce-pos-weight" + LR03),
    "lite2": ("backbone tf_efficientnet_lite2 (package weights)", "--backbone tf_efficientnet_lite2" + LR03),
    "no_ema": ("− EMA", "--no-model-ema" + LR03),
    "chosen": ("plain BCE and − EMA together", "--focal-weight 0 --no-bce-pos-weight --no-model-ema" + LR03),
    "bce_noema_lr1": ("plain BCE, − EMA, backbone lr = head lr", "--focal-weight 0 --no-bce-pos-weight --no-model-ema"),
    "preset": ("backbone lr = head lr: the cpu preset", ""),
    "freeze4": ("stem + 4 stages frozen", "--freeze-stages 4" + LR03),
    "scratch": ("no pretrained weights (lite0 from random, nothing frozen)", "--no-pretrained --freeze-stages 0"),
}
FIGURES = (("final", lambda t: t["odir"]["final"]), ("kappa", lambda t: t["odir"]["kappa"]),
           ("auc_macro", lambda t: t["at_0.5"]["auc_macro"]), ("f1_macro_tuned", lambda t: t["tuned"]["f1_macro"]),
           ("ece_after", lambda t: t["calibration_error"]["ece_after"]),
           ("trivial_final", lambda t: t["trivial"]["odir"]["final"]))


def start_run(key: str, seed: int, s: Settings, data: Path) -> tuple[subprocess.Popen, float]:
    name = f"{key}-s{seed}"
    cmd = [sys.executable, "train.py", "--data", str(data), "--preset", "cpu", "--folds", "0", "--out", s.out,
           "--name", name, "--seed", str(seed), *shlex.split(s.extra), *shlex.split(ROWS[key][1])]
    if s.cache_dir:
        cmd += ["--cache-dir", s.cache_dir]
    env = dict(os.environ)
    if s.parallel > 1:
        cmd += ["--loader-threads", "1"]
        env["OMP_NUM_THREADS"] = "1"
    log = open(Path(s.out) / f"{name}.log", "w")
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env), time.perf_counter()


def result_of(key: str, seed: int, s: Settings, returncode: int, seconds: float) -> dict:
    name = f"{key}-s{seed}"
    report = Path(s.out) / name / "report.json"
    if returncode != 0 or not report.is_file():
        tail = (Path(s.out) / f"{name}.log").read_text()[-1500:]
        return {"key": key, "seed": seed, "error": tail, "seconds": round(seconds, 1)}
    test = json.loads(report.read_text())["test"]
    return {"key": key, "seed": seed, "seconds": round(seconds, 1), **{k: f(test) for k, f in FIGURES}}


def summarise(runs: list[dict], keys: list[str]) -> list[dict]:
    rows = []
    for key in keys:
        ok = [r for r in runs if r["key"] == key and "error" not in r]
        row = {"key": key, "setting": ROWS[key][0], "runs": len(ok)}
        for k, _ in FIGURES:
            values = [r[k] for r in ok]
            row[k] = statistics.mean(values) if values else None
            row[k + "_spread"] = max(values) - min(values) if len(values) > 1 else None
        rows.append(row)
    base = next((r for r in rows if r["key"] == "base" and r["final"] is not None), None)
    for r in rows:
        r["delta_final"] = r["final"] - base["final"] if base and r["final"] is not None else None
    return rows


def print_rows(rows: list[dict]) -> None:
    print(f"{'setting':<62} runs  test final (±spread)  Δ base   kappa   AUC mac  F1 mac tuned  ECE    trivial")
    for r in rows:
        if r["final"] is None:
            print(f"{r['setting']:<62} {r['runs']:>4}  failed")
            continue
        spread = f"±{r['final_spread'] / 2:.3f}" if r["final_spread"] is not None else "     "
        delta = f"{r['delta_final']:+.3f}" if r["delta_final"] is not None else "     -"
        print(f"{r['setting']:<62} {r['runs']:>4}  {r['final']:.3f} {spread}        {delta}   "
              f"{r['kappa']:.3f}   {r['auc_macro']:.3f}    {r['f1_macro_tuned']:.3f}        {r['ece_after']:.3f}  "
              f"{r['trivial_final']:.3f}")


def main(argv=None) -> int:
    from benchmarks.common import settings_from_cli

    s, _ = settings_from_cli(Settings, {}, argv, __doc__)
    data = real_odir()
    if data is None:
        raise SystemExit("the real ODIR subset (../shared/data/odir5k-256) is not here: nothing to ablate on")
    keys = list(ROWS) if s.rows == "all" else [k.strip() for k in s.rows.split(",")]
    unknown = [k for k in keys if k not in ROWS]
    if unknown:
        raise SystemExit(f"--rows: unknown {unknown}; choose from {', '.join(ROWS)}")
    info = header("cpu")
    print_header(info, "benchmarks/recipe_ablation.py: training recipe on real photographs (test split)")
    print(f"settings: {s}")
    Path(s.out).mkdir(parents=True, exist_ok=True)
    todo = [(key, int(seed)) for key in keys for seed in s.seeds.split(",")]  # a row's seeds run side by side
    runs, running = [], {}
    for key, seed in list(todo):  # an interrupted ablation goes on where it stopped: finished runs are read back
        if (Path(s.out) / f"{key}-s{seed}" / "report.json").is_file():
            todo.remove((key, seed))
            runs.append({**result_of(key, seed, s, 0, 0.0), "reused": True})
            print(f"  {key} seed {seed}: reused {Path(s.out) / f'{key}-s{seed}'} (delete it to run again)")
    if s.collect:
        todo = []
    while todo or running:
        while todo and len(running) < s.parallel:
            key, seed = todo.pop(0)
            running[(key, seed)] = start_run(key, seed, s, data)
        time.sleep(2)
        for (key, seed), (proc, t0) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[(key, seed)]
            runs.append(result_of(key, seed, s, proc.returncode, time.perf_counter() - t0))
            r = runs[-1]
            print(f"  {key} seed {seed}: " + (f"test final {r['final']:.3f}, AUC macro {r['auc_macro']:.3f}, "
                                              f"{r['seconds']:.0f} s" if "error" not in r else
                                              f"FAILED: {r['error'][-300:]}"), flush=True)
            write_results(s.results, info, s, summarise(runs, keys), runs=runs)
    if s.collect:
        write_results(s.results, info, s, summarise(runs, keys), runs=runs)
    print()
    print_rows(summarise(runs, keys))
    return 0 if all("error" not in r for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# GPU host check, about 8 minutes on one H100, no network:
#   1. imports and devices (missing pieces named; exit 2 at once)
#   2. GPU tests: python -m pytest -m gpu tests/test_gpu.py
#   3. benchmarks at full size: loader, train_step, infer (another engineer's; a failure there is only noted),
#      end_to_end (gets the time left, stopped at its limit and projected)
#   4. one summary table, targets against measured values, from the fresh JSON files in benchmarks/results/
# Expects torch, timm, onnx, onnxruntime preinstalled and the offline wheel bundle (DALI, onnxruntime-gpu, openpyxl)
# on PYTHONPATH=/tmp/site. Every stage runs under `timeout`; a failing stage does not stop the others.
# Exit status: 0 all stages passed and every target met; 1 a stage failed; 2 preflight failed; 3 targets missed.
# Logs and result files are copied to $OUT when it is set (the device runner brings $OUT back).
#
#   PYTHONPATH=/tmp/site:$PYTHONPATH bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3 || command -v python)}
BUDGET_S=${GPU_CHECK_BUDGET_S:-470}  # whole script, seconds; end_to_end gets what the other stages leave
LOGS=benchmarks/results/gpu_check
mkdir -p "$LOGS"
T0=$(date +%s)
MARK=$(mktemp); trap 'rm -f "$MARK"' EXIT  # results older than this file are from another run: ignored
failed=()
elapsed() { echo $(( $(date +%s) - T0 )); }

stage() {  # stage NAME TIMEOUT_S [tolerate] -- command...
  local name=$1 limit=$2 tolerate=0; shift 2
  [ "$1" = tolerate ] && { tolerate=1; shift; }
  [ "$1" = -- ] && shift
  echo; echo "=== [$(elapsed) s] $name (timeout ${limit} s): $*"
  local t=$(date +%s)
  timeout --kill-after=15 "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
  local rc=${PIPESTATUS[0]}
  local took=$(( $(date +%s) - t ))
  if [ "$rc" -eq 0 ]; then echo "--- $name: ok in ${took} s"
  elif [ "$tolerate" -eq 1 ]; then echo "--- $name: FAILED (rc $rc, ${took} s) - tolerated, see $LOGS/$name.log"
  else
    [ "$rc" -eq 124 ] && echo "--- $name: TIMED OUT after ${limit} s" || echo "--- $name: FAILED (rc $rc, ${took} s)"
    failed+=("$name")
  fi
  return 0
}

# ------------------------------------------------------------------------------------------------ 1. preflight
echo "=== gpu_check: $(date -u +%FT%TZ) · $($PY --version 2>&1) ($PY) · PYTHONPATH=${PYTHONPATH:-}"
timeout 120 "$PY" - <<'PY' 2>&1 | tee "$LOGS/preflight.log"
import sys
missing = []

def check(what, fn):
    try:
        info = fn()
        print(f"  ok   {what}: {info}")
    except Exception as e:  # noqa: BLE001
        missing.append(what)
        print(f"  MISSING {what}: {type(e).__name__}: {e}")

def cuda():
    import torch
    assert torch.cuda.is_available(), f"torch {torch.__version__} sees no CUDA device (driver? CUDA_VISIBLE_DEVICES?)"
    return f"{torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}, torch {torch.__version__}, CUDA {torch.version.cuda}"

def dali():
    import nvidia.dali as d
    from nvidia.dali.plugin.pytorch import DALIGenericIterator  # noqa: F401
    return f"nvidia.dali {d.__version__} from {d.__file__}"

def ort_cuda():
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper
    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    assert "CUDAExecutionProvider" in ort.get_available_providers(), (
        f"onnxruntime {ort.__version__} at {ort.__file__} has no CUDA provider (onnxruntime-gpu not first on the path?)")
    g = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = min(m.ir_version, 9)
    s = ort.InferenceSession(m.SerializeToString(), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert s.get_providers()[0] == "CUDAExecutionProvider", f"CUDA provider failed to load: {s.get_providers()}"
    return f"onnxruntime {ort.__version__} ({ort.__file__}), a session runs on CUDAExecutionProvider"

def mod(name):
    def f():
        m = __import__(name)
        return f"{name} {getattr(m, '__version__', '?')}"
    return f

check("CUDA device (torch)", cuda)
check("nvidia.dali", dali)
check("onnxruntime CUDA provider", ort_cuda)
for name in ("openpyxl", "timm", "pytest", "pandas", "torchvision", "sklearn", "matplotlib", "tqdm", "onnx", "onnxscript", "PIL"):
    check(name, mod(name))
if missing:
    print(f"\npreflight FAILED, missing: {', '.join(missing)}. DALI, onnxruntime-gpu and openpyxl come from the offline "
          "wheel bundle: bash OUTDIR/install.sh && export PYTHONPATH=/tmp/site:$PYTHONPATH")
    sys.exit(2)
PY
rc=${PIPESTATUS[0]}
if [ "$rc" -ne 0 ]; then
  echo "gpu_check: preflight failed (rc $rc); nothing else was run."
  [ -n "${OUT:-}" ] && mkdir -p "$OUT/results" && cp -r "$LOGS" "$OUT/results/"
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null || true

# ------------------------------------------------------------------------------------------------ 2-3. stages
stage tests 100 -- "$PY" -m pytest -m gpu tests/test_gpu.py -q -s -p no:cacheprovider
stage loader 75 -- "$PY" benchmarks/loader.py --device cuda
# the rows the summary needs; the extra compiled ablation rows (compile, all) cost a compilation each: run them alone
stage train_step 150 -- "$PY" benchmarks/train_step.py --device cuda \
  --rows eager_fp32,seed,seed_pil,fast,fast_dali,bf16,channels_last
if [ -f benchmarks/infer.py ]; then
  stage infer 60 tolerate -- "$PY" benchmarks/infer.py --device cuda
else
  echo; echo "--- infer: benchmarks/infer.py is not there yet - skipped (noted in the summary)"
fi
left=$(( BUDGET_S - $(elapsed) - 10 ))
[ $left -lt 120 ] && left=120  # below that it cannot finish two epochs (compilation alone ~1 min): overrun
# data generation and preparation come first (~40 s for 3,500 synthetic patients); the run gets the rest
stage end_to_end "$left" -- "$PY" benchmarks/end_to_end.py --device cuda --time-limit-s $(( left - 60 ))

# ------------------------------------------------------------------------------------------------ 4. summary
echo; echo "=== [$(elapsed) s] summary"
"$PY" - "$MARK" <<'PY'
import json, os, sys
from pathlib import Path

mark = os.path.getmtime(sys.argv[1])
res = Path("benchmarks/results")

def load(name):
    p = res / f"{name}.json"
    if not p.exists() or p.stat().st_mtime < mark:
        return None  # absent, or left by an earlier run
    d = json.loads(p.read_text())
    return d if (d.get("header") or {}).get("gpu") or d.get("device", "").startswith("cuda") else None

def row(d, **match):
    for r in (d or {}).get("rows", []):
        if all(r.get(k) == v for k, v in match.items()) and "error" not in r:
            return r
    return None

lines, missed = [], 0
def add(what, target, value, ok, note=""):
    global missed
    status = "n/a" if value is None else ("ok" if ok else "MISSED")
    missed += status == "MISSED"
    lines.append((what, target, "not measured" if value is None else value, status, note))

ts, ld, e2e, inf = load("train_step"), load("loader"), load("end_to_end"), load("infer")
fast, fast_c = row(ts, key="fast_dali"), row(ts, key="fast")
seed, seed_c = row(ts, key="seed_pil"), row(ts, key="seed")
v = fast and fast["pairs_per_s"]
add("training, fast preset fed by DALI", ">= 900 pairs/s", v and f"{v:.0f} pairs/s", v and v >= 900,
    fast_c and f"compute only {fast_c['pairs_per_s']:.0f} pairs/s")
v = fast and fast.get("data_wait_pct")
add("data wait, fast preset + DALI", "< 5 % of step time", None if v is None else f"{v:.1f} %", v is not None and v < 5)
dali = row(ld, data="prepared", loader="dali")
v = dali and dali["images_per_s"]
add("DALI alone, prepared images", ">= 3,000 images/s", v and f"{v:.0f} images/s", v and v >= 3000,
    dali and f"x{dali['x_reference']:.1f} the PIL DataLoader" if dali and dali.get("x_reference") else "")
best = None
for r in (inf or {}).get("rows", []):  # benchmarks/infer.py: the fastest onnxruntime fp16 row on CUDA
    name = str(r.get("setting", "")).lower()
    if "onnxruntime" in name and "fp16" in name and "cpu" not in name and r.get("pairs_per_s") and "error" not in r:
        best = r if best is None or r["pairs_per_s"] > best["pairs_per_s"] else best
v = best and best["pairs_per_s"]
add("ORT fp16 scoring (CUDA provider)", ">= 3,000 pairs/s", v and f"{v:.0f} pairs/s", v and v >= 3000,
    best and str(best.get("setting", ""))[:40] or ("infer.json missing" if inf is None else "no fp16 row found"))
s = (e2e or {}).get("summary") or {}
if s.get("finished") and s.get("epochs_requested") == 25:
    v, note = s["total_s"], "measured: all 25 epochs ran"
elif s.get("steady_epoch_s"):
    v = s["first_epoch_s"] + 24 * s["steady_epoch_s"]
    note = (f"PROJECTED: first epoch {s['first_epoch_s']:.0f} s (start-up, compile) + 24 x {s['steady_epoch_s']:.1f} s "
            f"({s['epochs_done']} epochs ran)")
else:
    v, note = None, f"{s.get('epochs_done')} epochs finished within the limit" if s else ""
add(f"25 epochs of {s.get('n_train') or 2975} pairs, whole run", "< 180 s", v and f"{v:.0f} s", v and v < 180, note)
v = fast and seed and fast["pairs_per_s"] / seed["pairs_per_s"]
add("speed-up vs the seed's way (seed preset + PIL)", "> 1 (report)", v and f"x{v:.1f} pairs/s", v and v > 1,
    seed and f"seed way {seed['pairs_per_s']:.1f} pairs/s" + (f", seed compute only {seed_c['pairs_per_s']:.1f}"
                                                             if seed_c else ""))
hdr = (ts or ld or e2e or {}).get("header", {})
print(f"GPU: {hdr.get('gpu')} · CPU: {hdr.get('cpu')} ({hdr.get('cores_usable')} cores) · torch {hdr.get('torch')} · "
      f"DALI {hdr.get('dali')} · onnxruntime {hdr.get('onnxruntime')} · commit {hdr.get('commit')}")
cols = ("check", "target", "measured", "status", "note")
w = [max(len(str(x[i])) for x in lines + [cols]) for i in range(5)]
for n, l in enumerate([cols] + lines):
    print(" | ".join(str(c).ljust(w[i]) for i, c in enumerate(l)).rstrip())
    if n == 0:
        print("-+-".join("-" * x for x in w))
sys.exit(3 if missed else 0)
PY
summary_rc=$?

if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT/results" && cp benchmarks/results/*.json "$OUT/results/" 2>/dev/null; cp -r "$LOGS" "$OUT/results/"
fi
echo
echo "gpu_check: $(elapsed) s in all; failed stages: ${failed[*]:-none}; summary rc $summary_rc"
[ ${#failed[@]} -gt 0 ] && exit 1
exit $summary_rc

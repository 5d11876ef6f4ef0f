#!/usr/bin/env bash
# GPU host check, at most 8 minutes on one H100 by construction, no network:
#   1. imports and devices (missing pieces named; exit 2 at once). onnxruntime-gpu is optional: without it the
#      onnxruntime CUDA test and the infer stage are skipped and say so
#   2. GPU tests: python -m pytest -m gpu tests/test_gpu.py
#   3. benchmarks at full size: loader (prepared rows first), train_step (the summary's rows), candidates (issue
#      12's speed candidates against fast, each with its logit difference), infer (only with onnxruntime-gpu;
#      another engineer's, a failure there is only noted), end_to_end (gets the time left, stopped and projected)
#   4. one summary table, targets against measured values, and the candidates' table, from the fresh JSON files
# Every stage runs under `timeout` with a slot from one budget (GPU_CHECK_BUDGET_S, 465 s): a stage's limit is its
# cap or less, so that the stages after it keep their minimum; the benchmarks stop starting rows inside their slot
# and list what they did not reach. A failing stage does not stop the others.
# Expects torch, timm, onnx, onnxruntime preinstalled (the device image has them) and the offline wheel bundle on
# PYTHONPATH=/tmp/site: DALI + openpyxl (`offline-wheels.sh OUTDIR dali`, 3 parts), onnxruntime-gpu optionally.
# GPU_CHECK_STAGES (comma list, default all: tests,loader,train_step,candidates,infer,end_to_end) runs a subset;
# GPU_CHECK_CANDIDATES (default: candidates = fast + every candidate) picks candidate rows, e.g. the ones a first
# run did not reach. The torch.compile cache persists in $ODIR_CACHE/torch-compile (engine.persist_compile_cache).
# Exit status: 0 all stages passed and every target met; 1 a stage failed; 2 preflight failed; 3 targets missed.
# GPU_CHECK_DEVICE=cpu, a dry run of the plumbing (tests/test_gpu.py runs it in the slow suite): smaller benchmark
# settings and twice the time limits (see SMALL_*), and the targets, a GPU's, only shown: exit 0 when every stage
# passed.
# Logs and result files are copied to $OUT when it is set (the device runner brings $OUT back).
#
#   bash OUTDIR/install.sh && export PYTHONPATH=/tmp/site:$PYTHONPATH \
#     LD_LIBRARY_PATH=/tmp/site/nvidia/cu13/lib:$LD_LIBRARY_PATH && bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3 || command -v python)}
# The code imports `odir_dual.…`; on a host without the project installed (`pip install -e .`), a link named
# odir_dual → this clone on PYTHONPATH stands in for the install.
if ! "$PY" -c "import odir_dual.pipeline.constants" 2>/dev/null; then
  LINK_DIR=$(mktemp -d); ln -s "$PWD" "$LINK_DIR/odir_dual"; export PYTHONPATH="$LINK_DIR${PYTHONPATH:+:$PYTHONPATH}"
fi
BUDGET_S=${GPU_CHECK_BUDGET_S:-465}  # whole script, seconds (8 min less a margin); end_to_end gets the rest
STAGES=",${GPU_CHECK_STAGES:-tests,loader,train_step,candidates,infer,end_to_end},"
CANDIDATE_ROWS=${GPU_CHECK_CANDIDATES:-candidates}
DEV=${GPU_CHECK_DEVICE:-cuda}  # cpu: a dry run of the plumbing on a machine without a GPU (CPU settings, no compile)
COMPILE=$([ "$DEV" = cuda ] && echo --compile)  # compiled candidates on a CPU: minutes of C++ compilation each
# Stage caps and minimums, seconds (H100 estimates from the issue's H200 figures: ConvNeXt-S compiles in ~35 s).
CAP_TESTS=80 CAP_LOADER=60 CAP_STEP=100 CAP_CAND=90 CAP_INFER=45 MIN_E2E=110 MIN_STAGE=20
# The CPU dry run checks that every stage runs, not speed: fewer patients and timed steps than the benchmarks' CPU
# defaults (4 min 11 s without these on a shared 2-core Xeon), and twice every limit, budget included, since a
# shared CPU under load runs several times slower than an idle one. The GPU run passes none of these.
SMALL_LOADER=() SMALL_STEP=() SMALL_E2E=()
if [ "$DEV" = cpu ]; then
  SMALL_LOADER=(--n-patients 32 --full-px 1024 --batches 4 --full-batches 2)  # originals 1 MP, not 5 MP
  SMALL_STEP=(--steps 3 --data-steps 3 --data-patients 32 --data-src-px 1024)  # the loader's synthetic set
  SMALL_E2E=(--n-patients 120)
  BUDGET_S=$((BUDGET_S * 2)) CAP_TESTS=$((CAP_TESTS * 2)) CAP_LOADER=$((CAP_LOADER * 2)) CAP_STEP=$((CAP_STEP * 2))
  CAP_CAND=$((CAP_CAND * 2)) CAP_INFER=$((CAP_INFER * 2)) MIN_E2E=$((MIN_E2E * 2))
fi
LOGS=benchmarks/results/gpu_check
mkdir -p "$LOGS"
T0=$(date +%s)
MARK=$(mktemp); trap 'rm -f "$MARK"' EXIT  # results older than this file are from another run: ignored
failed=() skipped=()
ORT_OK="$LOGS/onnxruntime-cuda.ok"; rm -f "$ORT_OK"  # written by the preflight when the CUDA provider runs
elapsed() { echo $(( $(date +%s) - T0 )); }

wanted() { [[ $STAGES == *",$1,"* ]]; }

slot() {  # slot CAP RESERVE: a stage's time limit, CAP at most, leaving RESERVE s of the budget to later stages
  local left=$(( BUDGET_S - $(elapsed) - $2 ))
  echo $(( left < $1 ? left : $1 ))
}

stage() {  # stage NAME TIMEOUT_S [tolerate] -- command...
  local name=$1 limit=$2 tolerate=0; shift 2
  [ "$1" = tolerate ] && { tolerate=1; shift; }
  [ "$1" = -- ] && shift
  if [ "$limit" -lt "$MIN_STAGE" ]; then
    echo; echo "--- $name: SKIPPED, only ${limit} s of the budget left for it"; skipped+=("$name"); return 0
  fi
  echo; echo "=== [$(elapsed) s] $name (timeout ${limit} s): $*"
  local t=$(date +%s)
  timeout --kill-after=5 "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
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
timeout 90 "$PY" - "$ORT_OK" "$DEV" <<'PY' 2>&1 | tee "$LOGS/preflight.log"
import sys
missing = []

def check(what, fn, optional=""):
    try:
        info = fn()
        print(f"  ok   {what}: {info}")
        return True
    except Exception as e:  # noqa: BLE001
        if not optional:
            missing.append(what)
        print(f"  {'absent (optional: ' + optional + ')' if optional else 'MISSING'} {what}: {type(e).__name__}: {e}")
        return False

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

check("CUDA device (torch)", cuda, optional="GPU_CHECK_DEVICE=cpu: a dry run" if sys.argv[2] == "cpu" else "")
check("nvidia.dali", dali)
if check("onnxruntime CUDA provider", ort_cuda, optional="its test and the infer stage are skipped"):
    open(sys.argv[1], "w").close()
for name in ("openpyxl", "timm", "pytest", "pandas", "torchvision", "sklearn", "matplotlib", "tqdm", "onnx", "onnxscript", "PIL"):
    check(name, mod(name))
if missing:
    print(f"\npreflight FAILED, missing: {', '.join(missing)}. DALI and openpyxl come from the offline wheel bundle "
          "(../shared/tools/offline-wheels.sh OUTDIR dali; onnxruntime-gpu: 'all'): bash OUTDIR/install.sh && "
          "export PYTHONPATH=/tmp/site:$PYTHONPATH LD_LIBRARY_PATH=/tmp/site/nvidia/cu13/lib:$LD_LIBRARY_PATH")
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
# Each slot leaves the minimum of every later stage: loader + train_step + candidates + end_to_end after the tests.
if wanted tests; then
  deselect=(); [ -f "$ORT_OK" ] || deselect=(-k "not onnxruntime")  # no onnxruntime-gpu: its test is skipped
  stage tests "$(slot $CAP_TESTS $((CAP_LOADER + CAP_STEP + CAP_CAND + MIN_E2E)))" -- \
    "$PY" -m pytest -m gpu tests/test_gpu.py -q -s -p no:cacheprovider "${deselect[@]}"
fi
if wanted loader; then  # prepared and real rows first, full-size last (the summary needs the prepared row)
  stage loader "$(slot $CAP_LOADER $((CAP_STEP + CAP_CAND + MIN_E2E)))" -- "$PY" benchmarks/loader.py --device $DEV \
    "${SMALL_LOADER[@]}"
fi
if wanted train_step; then  # the summary's rows; the compiled ablation rows (compile, all) cost a compilation each
  limit=$(slot $CAP_STEP $((CAP_CAND + MIN_E2E)))
  stage train_step "$limit" -- "$PY" benchmarks/train_step.py --device $DEV --budget-s $((limit - 15)) \
    --rows eager_fp32,seed,seed_pil,fast,fast_dali,bf16,channels_last "${SMALL_STEP[@]}"
fi
if wanted candidates; then  # fast first (a compile-cache hit after train_step), then each candidate; see CANDIDATES
  limit=$(slot $CAP_CAND $MIN_E2E)
  stage candidates "$limit" -- "$PY" benchmarks/train_step.py --device $DEV --budget-s $((limit - 15)) \
    $COMPILE --rows "$CANDIDATE_ROWS" --results train_step_candidates "${SMALL_STEP[@]}"
fi
if wanted infer && [ -f "$ORT_OK" ] && [ -f benchmarks/infer.py ]; then
  stage infer "$(slot $CAP_INFER $MIN_E2E)" tolerate -- "$PY" benchmarks/infer.py --device $DEV
elif wanted infer; then
  why=$([ -f "$ORT_OK" ] && echo "benchmarks/infer.py is not there" || echo "no onnxruntime-gpu")
  echo; echo "--- infer: skipped ($why)"
fi
if wanted end_to_end; then
  left=$(( BUDGET_S - $(elapsed) - 10 ))
  # data generation and preparation come first (~40 s for 3,500 synthetic patients); the run gets the rest
  stage end_to_end "$left" -- "$PY" benchmarks/end_to_end.py --device $DEV \
    --time-limit-s $(( left > 70 ? left - 60 : 10 )) "${SMALL_E2E[@]}"
fi

# ------------------------------------------------------------------------------------------------ 4. summary
echo; echo "=== [$(elapsed) s] summary"
"$PY" - "$MARK" "$DEV" <<'PY'
import json, os, sys
from pathlib import Path

mark = os.path.getmtime(sys.argv[1])
res = Path("benchmarks/results")

def load(name):
    p = res / f"{name}.json"
    if not p.exists() or p.stat().st_mtime < mark:
        return None  # absent, or left by an earlier run
    d = json.loads(p.read_text())
    on_gpu = (d.get("header") or {}).get("gpu") or d.get("device", "").startswith("cuda")
    return d if on_gpu or sys.argv[2] == "cpu" else None  # a CPU dry run summarises its CPU rows

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

cand = load("train_step_candidates")  # issue 12's candidates: the winners become fast's defaults (by hand)
if cand:
    print(f"\ncandidates against fast, synthetic tensors, same weights and batch (benchmarks/train_step.py):")
    fmt = lambda v, f: "-" if v is None else f.format(v)
    table = [("setting", "pairs/step", "pairs/s", "x fast", "ms/step", "peak MiB", "warm-up s", "dlogit 1", "dlogit k")]
    for r in cand["rows"]:
        table.append((r["setting"][:70], fmt(r.get("batch"), "{}"), fmt(r.get("pairs_per_s"), "{:.1f}"),
                      fmt(r.get("x_fast"), "{:.3f}"), fmt(r.get("ms_per_step"), "{:.1f}"),
                      fmt(r.get("peak_mem_mib"), "{:.0f}"), fmt(r.get("warmup_s"), "{:.1f}"),
                      fmt(r.get("dlogit_first"), "{:.1e}"), fmt(r.get("dlogit_after"), "{:.1e}")))
    w = [max(len(x[i]) for x in table) for i in range(len(table[0]))]
    for n, l in enumerate(table):
        print(" | ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(l)))
        if n == 0:
            print("-+-".join("-" * x for x in w))
    if cand.get("not_reached"):
        print(f"not reached in this run (GPU_CHECK_STAGES=candidates GPU_CHECK_CANDIDATES=fast,...): "
              f"{','.join(cand['not_reached'])}")
if missed and sys.argv[2] == "cpu":  # a CPU is not held to a GPU's targets: the dry run checked the plumbing
    print(f"\nCPU dry run: {missed} GPU target(s) not met on this CPU, as expected; not an error here")
sys.exit(3 if missed and sys.argv[2] != "cpu" else 0)
PY
summary_rc=$?

if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT/results" && cp benchmarks/results/*.json "$OUT/results/" 2>/dev/null; cp -r "$LOGS" "$OUT/results/"
fi
echo
echo "gpu_check: $(elapsed) s in all; failed stages: ${failed[*]:-none}; skipped for time: ${skipped[*]:-none};" \
  "summary rc $summary_rc"
[ ${#failed[@]} -gt 0 ] && exit 1
exit $summary_rc

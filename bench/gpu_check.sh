#!/usr/bin/env bash
# One call on a lent GPU machine: build, GPU tests, validate, benchmarks; short table last.
#
#   bash bench/gpu_check.sh                 # from the repository root, on the GPU machine
#   bash bench/gpu_check.sh --device cpu --skip-build   # dry run of the non-GPU parts
#
# Works offline on the device image (Python 3.12, its own torch and triton):
# nothing is downloaded, the package is installed with --no-deps
# --no-build-isolation. Every stage has a timeout and the whole run is kept
# under RAMDA_CHECK_TOTAL seconds (default 570, inside the 600 s a call may
# run). Logs, the CSV, RESULTS.md and the plot go to $OUT (default
# bench/out); at most 8 files, as the device tool brings back.
#
# Stage 3b prints bench/state_bytes.py's table (on a GPU with the allocator's
# counters: torch.cuda.max_memory_allocated per optimizer and dtype).
#
# Stage 5 runs compute-sanitizer (memcheck, racecheck, synccheck, initcheck)
# on one small RAMDA + group lasso step per backend (cuda, triton) with what
# time is left, when the tool is on the machine; verdicts in sanitizer.log.
#
# Knobs: RAMDA_CHECK_TOTAL, RAMDA_CHECK_T_BUILD (200), RAMDA_CHECK_T_TESTS (140),
# RAMDA_CHECK_T_SANITIZE (60 per tool and backend),
# RAMDA_CHECK_T_VALIDATE (80), RAMDA_CHECK_T_STATE (40), RAMDA_CHECK_T_BENCH (130); VALIDATE_ARGS (default
# --quick), BENCH_ARGS (extra arguments for bench/bench_step.py), PYTEST_K (default
# "cuda or triton or gpu"); RAMDA_BENCH_COMMIT names the commit when .git is absent.
# Merge the results here afterwards with:
#   python bench/bench_step.py --merge <folder holding results.csv, RESULTS.md, *.png>

set -u
START=$(date +%s)
DEVICE=cuda
SKIP_BUILD=0
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE="$2"; shift 2 ;;
        --skip-build) SKIP_BUILD=1; shift ;;
        -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 2
OUT=${OUT:-$ROOT/bench/out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT:$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"
TOTAL=${RAMDA_CHECK_TOTAL:-570}
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
STATUS=()

say() { echo "$*" | tee -a "$SUMMARY"; }

# Seconds a stage may take: its cap, or what is left of TOTAL (minus 10 s to finish up).
budget() {
    local cap=$1 left=$(( TOTAL - ($(date +%s) - START) - 10 ))
    [ "$left" -lt "$cap" ] && cap=$left
    [ "$cap" -lt 1 ] && cap=1
    echo "$cap"
}

# stage NAME CAP LOG CMD...: run CMD under a timeout, log to LOG, record the outcome.
stage() {
    local name=$1 cap log=$3 t0 rc
    cap=$(budget "$2")
    shift 3
    t0=$(date +%s)
    echo "== $name (timeout ${cap}s): $*" | tee -a "$log" >&2
    timeout --kill-after=5 "$cap" "$@" >>"$log" 2>&1
    rc=$?
    local what="rc=$rc"
    [ $rc -eq 0 ] && what="ok"
    [ "$name" = tests ] && [ $rc -eq 5 ] && what="no tests selected"
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && what="TIMEOUT after ${cap}s"
    STATUS+=("$(printf '%-13s %-22s %4ss  %s' "$name" "$what" "$(( $(date +%s) - t0 ))" "$(basename "$log")")")
    return $rc
}

say "gpu_check $(date -u '+%Y-%m-%d %H:%M:%S UTC') device=$DEVICE out=$OUT"
command -v nvidia-smi >/dev/null && nvidia-smi -L 2>&1 | tee -a "$SUMMARY"
"$PY" - <<'EOF' 2>&1 | tee -a "$SUMMARY"
import platform, torch
try:
    import triton; tv = triton.__version__
except Exception as e:
    tv = f"none ({type(e).__name__})"
print(f"python {platform.python_version()}  torch {torch.__version__} (CUDA {torch.version.cuda})  triton {tv}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"{p.name}: cc {p.major}.{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB")
EOF

# -- 1. build (only for the card present: RAMDA_CUDA_ARCHS is read by tools/build_extension.py)
if [ "$SKIP_BUILD" = 1 ]; then
    STATUS+=("build         skipped (--skip-build)")
else
    ARCH=$("$PY" -c "import torch; c = torch.cuda.get_device_capability() if torch.cuda.is_available() else None; print(f'{c[0]}{c[1]}' if c else '')" 2>/dev/null)
    export MAX_JOBS=${MAX_JOBS:-16}
    if [ -n "$ARCH" ]; then export RAMDA_CUDA_ARCHS=${RAMDA_CUDA_ARCHS:-$ARCH}; else export RAMDA_SKIP_CUDA_BUILD=${RAMDA_SKIP_CUDA_BUILD:-1}; fi
    echo "RAMDA_CUDA_ARCHS=${RAMDA_CUDA_ARCHS:-} RAMDA_SKIP_CUDA_BUILD=${RAMDA_SKIP_CUDA_BUILD:-} MAX_JOBS=$MAX_JOBS" >> "$OUT/build.log"
    stage build "${RAMDA_CHECK_T_BUILD:-200}" "$OUT/build.log" \
        "$PY" -m pip install --no-build-isolation --no-deps --no-index -e .
    rc=$?
    # pip itself failed (not the clock): build in place; PYTHONPATH above finds the package
    if [ $rc -ne 0 ] && [ $rc -ne 124 ] && [ $rc -ne 137 ]; then
        stage build-inplace "${RAMDA_CHECK_T_BUILD:-200}" "$OUT/build.log" \
            "$PY" setup.py build_ext --inplace
    fi
    [ -f ramda_kernels/_build_info.json ] && { echo "build info:"; cat ramda_kernels/_build_info.json; echo; } >> "$SUMMARY"
fi
"$PY" -m ramda_kernels info 2>&1 | tee -a "$SUMMARY" | sed 's/^/  /' >&2

# -- 2. GPU tests (whatever test files exist; selected by name)
K=${PYTEST_K:-cuda or triton or gpu}
PER_TEST=()  # one hung test must not eat the stage (pytest-timeout is on the device image)
"$PY" -c "import pytest_timeout" 2>/dev/null && PER_TEST=(--timeout=60)
stage tests "${RAMDA_CHECK_T_TESTS:-140}" "$OUT/tests.log" \
    "$PY" -m pytest -q -p no:cacheprovider --durations=5 ${PER_TEST[@]+"${PER_TEST[@]}"} tests -k "$K"
TESTS_LINE=$(grep -E "passed|failed|error|deselected|no tests ran" "$OUT/tests.log" | tail -1)

# -- 3. every fast backend against the reference
# shellcheck disable=SC2086
stage validate "${RAMDA_CHECK_T_VALIDATE:-80}" "$OUT/validate.log" \
    "$PY" -m ramda_kernels validate --device "$DEVICE" ${VALIDATE_ARGS:---quick}
VALIDATE_LINE=$(grep -E "cases in|cases pass|cannot run|no CUDA" "$OUT/validate.log" | tr '\n' ';')

# -- 3b. optimizer state bytes per parameter, every optimizer and dtype: summed state tensors
#        and, on a GPU, torch.cuda.memory_allocated / max_memory_allocated around the first step
#        (the README's state-bytes table); logged with validate (the tool brings back 8 files)
stage state-bytes "${RAMDA_CHECK_T_STATE:-40}" "$OUT/validate.log" \
    "$PY" bench/state_bytes.py --device "$DEVICE"

# -- 4. benchmarks: RAMDA + group lasso exact fp32 on resnet50 and gpt2-medium vs fused AdamW,
#       copy bandwidth, reference-PG on resnet50, small solver and scaling sweeps
SETS=""
[ "$DEVICE" = cpu ] && SETS="--sets convnet"
BENCH_T=$(budget "${RAMDA_CHECK_T_BENCH:-130}")
# shellcheck disable=SC2086
stage bench "$BENCH_T" "$OUT/bench.log" \
    "$PY" bench/bench_step.py --device "$DEVICE" --preset gpu-check $SETS --out-dir "$OUT" \
    --deadline $(( BENCH_T * 3 / 4 )) ${BENCH_ARGS:-}

# -- 5. compute-sanitizer, one small step per backend: fp32 and bf16 tensors,
#       rows, columns and channels_last groups, exact then PG, each twice (the
#       second step reuses the cached table, as training does)
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null)
SAN_STEP='
import sys, torch, ramda_kernels as rk
backend = sys.argv[1]
torch.manual_seed(0)
shapes = [((13, 7), torch.float32, (0,)), ((7, 300), torch.float32, (1,)),
          ((8, 3, 3, 3), torch.bfloat16, (0, 2, 3))]
for solver in ("exact", "pg"):
    params = []
    for shape, dt, _ in shapes:
        p = torch.randn(shape, device="cuda").to(dt)
        p = p.contiguous(memory_format=torch.channels_last) if p.dim() == 4 else p
        params.append(torch.nn.Parameter(p))
    groups = [dict(params=[p], dims=d) for p, (_, _, d) in zip(params, shapes)]
    opt = rk.RAMDA(groups, lr=0.1, lambda_=0.4, solver=solver, backend=backend)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    torch.cuda.synchronize()
    assert all(torch.isfinite(p).all() for p in params), solver
print(backend, "ok")
'
if [ "$DEVICE" = cuda ] && [ -n "$SANITIZER" ]; then
    for backend in cuda triton; do
        for tool in memcheck racecheck synccheck initcheck; do
            stage "san-$backend-$tool" "${RAMDA_CHECK_T_SANITIZE:-60}" "$OUT/sanitizer.log" \
                "$SANITIZER" --tool "$tool" --error-exitcode 3 "$PY" -c "$SAN_STEP" "$backend"
        done
    done
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|Error|ok$" "$OUT/sanitizer.log" | sort | uniq -c >> "$SUMMARY"
else
    STATUS+=("sanitizer     skipped (device $DEVICE, compute-sanitizer ${SANITIZER:-not found})")
fi

# -- the short table, last
{
    echo
    echo "== stages ($(( $(date +%s) - START ))s in all)"
    printf '%s\n' "${STATUS[@]}"
    echo "tests:    ${TESTS_LINE:-see tests.log}"
    echo "validate: ${VALIDATE_LINE:-see validate.log}"
    echo
    awk '/^state bytes per parameter element/{p=1; print; next} p && /^\|/{print; next} {p=0}' \
        "$OUT/validate.log"
    echo
    # the bench's copy line and step table (its markdown, from "Copy bandwidth" to the solver section)
    awk '/^Copy bandwidth/{p=1} /^### Solver/{p=0} p' "$OUT/bench.log" | grep -E '^(Copy|\||- `)'
} | tee -a "$SUMMARY"
exit 0

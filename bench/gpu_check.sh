#!/usr/bin/env bash
# One-command GPU check (docs/benchmarks.md, "GPU check"): one short run on one GPU.
#
#   bash bench/gpu_check.sh                       # on the GPU machine, at the repo root
#   GPU_CHECK_DEVICE=cpu OUT=/tmp/gpucheck bash bench/gpu_check.sh   # dry run, tiny sizes
#   bash bench/gpu_check.sh --wheels              # here, once: wheels the GPU image lacks
#
# Steps, each under its own timeout, every one run whatever the others did:
#   env        nvidia-smi, python / torch / CUDA versions, the host-register probe
#   parity     tests/gpu_runtime/test_parity.py on the device (float32, bf16, fp16; pp = 1, 2)
#              and the device tests of the host-to-device copier and the streaming loader
#   kernels    the Triton decode kernel, the CUDA backend and the decode CUDA graphs
#   load       bench/load.py --device: host-to-device GB/s from the node cache (registered,
#              staged) against a copy of pinned memory
#   tpot       bench/tpot.py --shape llama2-7b: ours against transformers and two floors
#   coldstart  bench/coldstart.py --quick --device: pp = 1/2/4 over emulated links
# The steps' timeouts are capped by one budget (GPU_CHECK_BUDGET_S, default 450 s), so the
# whole script ends within about budget + 20 s even if a step hangs. GPU_CHECK_STEPS picks
# steps for a rerun (default "env parity kernels tpot load coldstart").
#
# Writes $OUT/gpu_check.log (everything printed) and $OUT/gpu_check.json (step -> rc, seconds,
# timeout, results, headline). Uses .venv/bin/python when present, else python3, with the repo
# and its platform/ (as package hydraserve) on PYTHONPATH. pyzmq and llguidance, which the GPU
# image lacks, are installed from .whl/*.whl when the image has no copy (--wheels fetches them;
# name .whl in the device run's carry).
set -u -o pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
WHEELS=${GPU_CHECK_WHEELS:-$REPO/.whl}

if [ "${1:-}" = "--wheels" ]; then
    PY=$REPO/.venv/bin/python
    [ -x "$PY" ] || PY=$(command -v python3)
    mkdir -p "$WHEELS"
    # the versions this checkout is tested with; abi3 wheels for the image's Python 3.12
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_26_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$WHEELS" pyzmq==27.3.0 llguidance==1.9.1 || exit 1
    if [ "$WHEELS" = "$REPO/.whl" ] && ! grep -qx '/.whl/' .git/info/exclude 2>/dev/null; then
        echo '/.whl/' >>.git/info/exclude  # never committed; it travels by carry
    fi
    ls -l "$WHEELS"
    echo "now run on the device: bash bench/gpu_check.sh, with carry [\".whl\"]"
    exit 0
fi

OUT=${OUT:-/tmp/gpu_check}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
BUDGET=${GPU_CHECK_BUDGET_S:-450}
RESERVE=15  # seconds kept for collecting the results
KILL_AFTER=5  # a step that ignores SIGTERM at its timeout is killed this much later
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
: >"$LOG"
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
START=$(date +%s)

log() { echo "$*" | tee -a "$LOG"; }

if [ -x "$REPO/.venv/bin/python" ]; then PY=$REPO/.venv/bin/python; else PY=$(command -v python3); fi
mkdir -p "$WORK/path"
ln -sfn "$REPO/platform" "$WORK/path/hydraserve"  # installed as hydraserve by `make venv`
export PYTHONPATH="$REPO:$WORK/path${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HYDRA_BENCH_CACHE=$WORK/cache
unset HYDRA_H2D

log "# gpu_check: device $DEVICE, budget ${BUDGET}s, python $PY, started $(date -u +%FT%TZ)"
log "# repo $REPO at $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')" \
    "($(git -C "$REPO" status --porcelain 2>/dev/null | wc -l) changed files)"
if ! "$PY" -c "import zmq, llguidance" 2>/dev/null; then
    if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        log "# installing $(cd "$WHEELS" && echo *.whl) into $WORK/site"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --target "$WORK/site" "$WHEELS"/*.whl 2>&1 | tee -a "$LOG"
        export PYTHONPATH="$WORK/site:$PYTHONPATH"
    else
        log "# pyzmq or llguidance missing and no wheels in $WHEELS: the steps will fail" \
            "(run 'bash bench/gpu_check.sh --wheels' where pip works, carry .whl)"
    fi
fi

STEPS=" ${GPU_CHECK_STEPS:-env parity kernels tpot load coldstart} "

# run_step NAME TIMEOUT CMD...: runs CMD under min(TIMEOUT, what the budget has left), its
# output into the log; appends "name rc seconds timeout" to steps.tsv
run_step() {
    local name=$1 nominal=$2
    shift 2
    [[ $STEPS == *" $name "* ]] || return 0
    local left=$((START + BUDGET - RESERVE - $(date +%s)))
    local limit=$((nominal < left ? nominal : left))
    if [ "$limit" -lt 10 ]; then
        log "=== $name: skipped, ${left}s left in the budget"
        printf '%s\t-\t0\t0\n' "$name" >>"$WORK/steps.tsv"
        return
    fi
    log "=== $name (timeout ${limit}s): $*"
    local t0 t1 rc
    t0=$(date +%s.%N)
    timeout -k "$KILL_AFTER" "$limit" "$@" </dev/null 2>&1 | tee -a "$LOG" "$WORK/$name.out"
    rc=${PIPESTATUS[0]}
    t1=$(date +%s.%N)
    printf '\n' | tee -a "$LOG"  # a step's output may end without one (pytest's dots)
    local seconds
    seconds=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
    log "=== $name: rc $rc in ${seconds}s"
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$seconds" "$limit" >>"$WORK/steps.tsv"
}

# the node pools (and the cold-start baseline's download) want a tmpfs with room: a
# container's /dev/shm may have 64 MB
df -h /dev/shm /tmp 2>&1 | tee -a "$LOG"
SHM_DIR=/dev/shm
SHM_FREE_KB=$(df -Pk /dev/shm 2>/dev/null | awk 'NR == 2 { print $4 }')
if [ -z "$SHM_FREE_KB" ] || [ "$SHM_FREE_KB" -lt $((6 * 1024 * 1024)) ]; then
    SHM_DIR=$WORK/shm
    mkdir -p "$SHM_DIR"
    log "# /dev/shm has ${SHM_FREE_KB:-?} KiB free, under 6 GiB: node pools in $SHM_DIR" \
        "(not a tmpfs: registration may fail there and loads stage instead)"
fi

if command -v nvidia-smi >/dev/null; then
    timeout 20 nvidia-smi 2>&1 | tee -a "$LOG"
else
    log "# no nvidia-smi on this machine"
fi

PARITY_FILES=(tests/gpu_runtime/test_parity.py tests/gpu_runtime/coldstart/test_cuda_copy.py
    tests/gpu_runtime/coldstart/test_coldstart_stream.py)
# --confcutdir: tests/conftest.py (the control plane's: Postgres, SQLAlchemy) is not loaded
PYTEST=("$PY" -m pytest -v -p no:cacheprovider --confcutdir=tests/gpu_runtime
    --junitxml="$WORK/parity.xml" --timeout=120 "${PARITY_FILES[@]}")
# the CUDA backend: the Triton decode kernel against a float64 reference (and in a captured
# graph), the backend's decode against the torch backend's, and the engine's decode graphs
# against its eager steps (on CPU they run Triton's interpreter or a stand-in capture)
KERNELS=("$PY" -m pytest -v -p no:cacheprovider --confcutdir=tests/gpu_runtime
    --junitxml="$WORK/kernels.xml" --timeout=60 tests/gpu_runtime/test_triton_decode.py
    tests/gpu_runtime/test_cuda_graphs.py tests/gpu_runtime/test_backends.py -k "cuda or graph")
if [ "$DEVICE" = "cpu" ]; then  # the dry run: the same steps on tiny sizes
    TEST_DEVICE=cpu
    PARITY_K="(test_parity and llama-gqa and not pp3 and not pp4) or cuda"
    TPOT=(--device cpu --shape quick --rounds 1 --threads 2)
    LOAD=(--device cpu --h2d --layers 1 --repeats 1 --shm-dir "$SHM_DIR")
    COLD=(--quick --device cpu --shm-dir "$SHM_DIR")
else
    TEST_DEVICE=$DEVICE
    PARITY_K="(test_parity and not pp3 and not pp4) or cuda"
    TPOT=(--device "$DEVICE" --shape llama2-7b)
    LOAD=(--device "$DEVICE" --shm-dir "$SHM_DIR")
    COLD=(--quick --device "$DEVICE" --shm-dir "$SHM_DIR")
fi

run_step env 30 "$PY" bench/gpu_check.py env --json "$WORK/env.json"
run_step parity 130 env HYDRA_TEST_DEVICE="$TEST_DEVICE" "${PYTEST[@]}" -k "$PARITY_K"
run_step kernels 70 "${KERNELS[@]}"
run_step tpot 90 "$PY" bench/tpot.py "${TPOT[@]}" --json "$WORK/tpot.json"
run_step load 60 "$PY" bench/load.py "${LOAD[@]}" --json "$WORK/load.json"
run_step coldstart 90 "$PY" bench/coldstart.py "${COLD[@]}" --json "$WORK/coldstart.json"

log "=== collect"
if ! timeout 20 "$PY" bench/gpu_check.py collect --work "$WORK" --out "$OUT/gpu_check.json" \
    --device "$DEVICE" --budget-s "$BUDGET" --started "$START" 2>&1 | tee -a "$LOG"; then
    # the driver itself failed: the bare step table, so the run still says what ran
    awk -F'\t' 'BEGIN { printf "{\"collect_failed\": true, \"steps\": {" }
        { printf "%s\"%s\": {\"rc\": \"%s\", \"seconds\": %s, \"timeout_s\": %s}",
          (NR > 1 ? ", " : ""), $1, $2, $3, $4 }
        END { print "}}" }' "$WORK/steps.tsv" >"$OUT/gpu_check.json"
fi
log "# gpu_check done in $(($(date +%s) - START))s; $OUT/gpu_check.json, $OUT/gpu_check.log"
rm -rf "$WORK"

#!/usr/bin/env bash
# One-command GPU check: versions, GPU tests, ceilings, tuning, quick benchmark, LSTMP, summary.
#
#   bash benchmarks/device_check.sh [OUTDIR]      (OUTDIR defaults to $OUT, else ./device-check-out)
#
# Runs from the repository root. Every step has its own time limit; a step that
# fails or runs out of time is logged and the next one runs. The whole script
# ends within $DEVICE_CHECK_BUDGET_S seconds (default 450, so under 8 minutes
# with the summary), each step's limit shrinking to leave the later steps their
# share; a smaller budget shrinks every share in proportion. summary.md is
# rewritten after every step, so a run cut short still returns one.
# The device copy has no .git: pass the commit in the command, e.g.
#   TRITON_RNN_GIT_COMMIT=<sha> bash benchmarks/device_check.sh
# Everything printed goes to OUTDIR/device_check.log too. OUTDIR ends up with at
# most 8 files (the device tool returns 8):
#   summary.md            steps, versions, ceilings and the benchmark tables
#   device_check.log      the full output of every step
#   floors.json           measured ceilings (python -m benchmarks.floors)
#   bench_quick.json/.png triton-rnn bench --quick against cuDNN
#   bench_lstmp.json      LSTM with a projection (proj_size) against cuDNN
#   bench_graphs.json     CUDA graphs (--cuda-graphs), one direction and bidirectional
#   bench_flashrnn.json   a few shapes against FlashRNN, when `import flashrnn` works
# Wheels found under .whl/ (FlashRNN, say) are installed to /tmp/site first.
# DEVICE_CHECK_SKIP_INSTALL=1 skips `pip install -e .` (PYTHONPATH=. is set anyway).

set -u
cd "$(dirname "$0")/.." || exit 1
ROOT=$(pwd)
OUTDIR=${1:-${OUT:-$ROOT/device-check-out}}
mkdir -p "$OUTDIR" || exit 1
OUTDIR=$(cd "$OUTDIR" && pwd)
LOG=$OUTDIR/device_check.log
SUMMARY=$OUTDIR/summary.md
: >"$LOG"
PY=${PYTHON:-python3}
START=$(date +%s)
BUDGET=${DEVICE_CHECK_BUDGET_S:-450}
DEADLINE=$((START + BUDGET))
STEPS_TSV=$(mktemp)
# The reserves below were sized for a 470 s budget: scale them to this one.
r() { echo $(($1 * BUDGET / 470)); }
COMMIT=${TRITON_RNN_GIT_COMMIT:-$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)}
export TRITON_RNN_GIT_COMMIT=$COMMIT

export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export MPLBACKEND=Agg
# The tuning cache in /tmp: no platformdirs needed, nothing left in the tree.
export TRITON_RNN_CACHE_DIR=${TRITON_RNN_CACHE_DIR:-/tmp/triton-rnn-cache}
# The benchmarks measure the default tiles, as an untuned user gets them: they read an
# empty tuning cache (the tune steps' entries would otherwise reach them, since a batch
# size without an entry takes the nearest tuned one's tile).
UNTUNED="TRITON_RNN_CACHE_DIR=/tmp/device-check-untuned"
rm -rf /tmp/device-check-untuned
unset TRITON_INTERPRET

log() { echo "[device_check $(($(date +%s) - START))s] $*" | tee -a "$LOG"; }

# step NAME MAX_S RESERVE_S COMMAND: run COMMAND (a bash string) with a time limit of
# MAX_S seconds, shortened so that RESERVE_S seconds stay for the later steps.
step() {
    local name=$1 max=$2 reserve=$3 cmd=$4
    local now left limit t0 rc
    now=$(date +%s)
    left=$((DEADLINE - now - reserve))
    limit=$((max < left ? max : left))
    # Under 15 s a step cannot even import torch and do something: skip it.
    if ((limit < 15)); then
        log "SKIP $name: no time left"
        printf '%s\tskipped\t0\t-\n' "$name" >>"$STEPS_TSV"
        LAST_RC=skipped
        return 0
    fi
    log "=== $name (limit ${limit}s): $cmd"
    t0=$(date +%s)
    timeout -k 10 "$limit" bash -c "$cmd" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    local took=$(($(date +%s) - t0))
    local what=ok
    if ((rc == 124 || rc == 137)); then what="TIMEOUT"; elif ((rc != 0)); then what="FAILED"; fi
    log "--- $name: $what (rc $rc, ${took}s)"
    printf '%s\t%s\t%s\t%s\n' "$name" "$what" "$took" "$rc" >>"$STEPS_TSV"
    LAST_RC=$rc
    write_summary
    return 0
}

# summary.md so far: steps, GPU test results, ceilings (the benchmark tables come at the end).
write_summary() {
    {
        echo "# triton-rnn device check"
        echo
        echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ), $(($(date +%s) - START)) s of a ${BUDGET} s budget"
        echo "- commit: $COMMIT"
        echo "- gpu: $( (nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || true) | head -1 | grep . || echo none)"
        echo
        echo "| step | result | seconds | rc |"
        echo "|---|---|---|---|"
        while IFS=$'\t' read -r n w s r; do echo "| $n | $w | $s | $r |"; done <"$STEPS_TSV"
        echo
        grep -E "^(=+ )?[0-9]+ (passed|failed|skipped|deselected|errors?)\b|no tests ran" "$LOG" | tail -1 | sed 's/^/gpu tests: /'
        grep -E "^(FAILED|ERROR) tests/" "$LOG" | sed 's/^/- /' | head -20
        echo
        if [ -s "$OUTDIR/floors.json" ]; then
            timeout 30 "$PY" "$ROOT/benchmarks/floors.py" --summarize "$OUTDIR/floors.json" 2>>"$LOG"
        fi
    } >"$SUMMARY.part"
    mv -f "$SUMMARY.part" "$SUMMARY"
}

log "out dir: $OUTDIR, budget ${BUDGET}s, python: $(command -v "$PY")"

# 1. Versions and device properties.
step versions 30 $(r 420) "nvidia-smi; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit,compute_mode --format=csv
$PY - <<'EOF'
import platform, torch
print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda,
      'cudnn', torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
try:
    import triton; print('triton', triton.__version__)
except Exception as e: print('triton unavailable:', e)
try:
    import flashrnn; print('flashrnn importable from', flashrnn.__file__)
except Exception as e: print('flashrnn not importable:', type(e).__name__, e)
print('cuda available:', torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print('device:', p.name, 'cc', f'{p.major}.{p.minor}', 'SMs', p.multi_processor_count,
          'memory GiB', round(p.total_memory / 2**30, 1))
EOF"

# 2. Install: carried wheels to /tmp/site, the package without deps (PYTHONPATH covers a failure).
if compgen -G "$ROOT/.whl/*.whl" >/dev/null; then
    step wheels 60 $(r 400) "$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $ROOT/.whl/*.whl"
    if [ "$LAST_RC" = 0 ]; then export PYTHONPATH="$PYTHONPATH:/tmp/site"; fi
fi
if [ -n "${DEVICE_CHECK_SKIP_INSTALL:-}" ]; then
    log "SKIP install: DEVICE_CHECK_SKIP_INSTALL is set (PYTHONPATH=$ROOT is used)"
else
    step install 60 $(r 390) "$PY -m pip install -q --no-deps --no-build-isolation -e ."
fi
step import 30 $(r 380) "$PY -c 'import triton_rnn, triton_rnn.kernels.launch; print(\"triton_rnn\", triton_rnn.__version__, \"from\", triton_rnn.__file__)'"

# 3. The GPU-only tests.
# Compiling dominates (each test builds its own kernels on the host CPU): with
# pytest-xdist (on the GPU image) the tests compile in parallel processes.
GPU_TEST_ARGS=""
$PY -c "import xdist" >/dev/null 2>&1 && GPU_TEST_ARGS="-n 8"
# A test that hangs (a grid barrier that never opens, say) is stopped after 90 s, its
# process with it (a hung kernel ignores signals), and the others go on.
$PY -c "import pytest_timeout" >/dev/null 2>&1 && GPU_TEST_ARGS="$GPU_TEST_ARGS --timeout 90 --timeout-method thread"
HAVE_CUDA=0
$PY -c "import sys, torch; sys.exit(not torch.cuda.is_available())" >/dev/null 2>&1 && HAVE_CUDA=1
# Meanwhile, eight processes compile the kernels the tuning and benchmark steps below launch
# (a few seconds of CPU each, cold: tens of them would otherwise be compiled one after
# another inside the benchmarks' time limits). Each runs its shapes once at T = 2 with
# token timing: T and B are not specialised, so the kernels are the ones the real runs
# use, and Triton's on-disk cache hands them over. They end (or are stopped) before the
# ceilings and benchmarks run, so nothing else shares the GPU while those time it.
WARM_PIDS=()
# They end when the GPU tests must (the same limit), at a lower CPU priority.
WARM_LIMIT=$((DEADLINE - $(date +%s) - $(r 300)))
((WARM_LIMIT > 150)) && WARM_LIMIT=150
# Steps 5 and 9 tune (defined here: their kernels are compiled in the background too).
TUNE_GRU_ARGS="--cell gru --hidden 1024 --batch 32 --dtype bfloat16 --backward --config 16,16,8,1,0,0,8 --config 16,16,8,1,0,0,1 --config 32,16,8,1,128"
TUNE_LSTM2048_ARGS="--cell lstm --hidden 2048 --batch 16 --dtype bfloat16 --config 16,16,8,1,128,1536 --config 16,16,8,1,128"
if ((HAVE_CUDA && WARM_LIMIT >= 15)); then
    WARM_ARGS="--seq-len 2 --impls triton,triton_stepwise --no-flashrnn --no-check --rounds 1 --sets 1 --warmup-ms 1 --rep-ms 1 --no-plot"
    i=0
    for shard in "--cells gru --hidden 256" "--cells gru --hidden 1024" "--cells lstm --hidden 256" \
        "--cells lstm --hidden 1024" "--cells lstm --hidden 1024 --proj 256 --batch 16,64" \
        "--cells gru --hidden 1024 --batch 16 --directions 2,1 --passes fwdbwd"; do
        i=$((i + 1))
        env $UNTUNED timeout -k 5 "$WARM_LIMIT" nice -n 10 \
            $PY -m triton_rnn.cli bench --quick $shard $WARM_ARGS \
            --out "/tmp/device-check-warm-$i.json" >"/tmp/device-check-warm-$i.log" 2>&1 &
        WARM_PIDS+=($!)
    done
    # The tunings' candidates too; their timings, taken beside the tests, go to a scratch cache.
    for args in "$TUNE_GRU_ARGS" "$TUNE_LSTM2048_ARGS"; do
        i=$((i + 1))
        TRITON_RNN_CACHE_DIR=/tmp/device-check-warm-cache timeout -k 5 "$WARM_LIMIT" \
            nice -n 10 $PY -m triton_rnn.cli tune $args >"/tmp/device-check-warm-$i.log" 2>&1 &
        WARM_PIDS+=($!)
    done
    log "compiling the benchmarks' kernels in ${#WARM_PIDS[@]} background processes (/tmp/device-check-warm-*.log)"
fi
# -v: each result is printed as it finishes, so a step cut short still says which passed.
step gpu_tests 150 $(r 300) "$PY -m pytest -m gpu $GPU_TEST_ARGS -v -rfE --durations=8 -p no:cacheprovider tests/test_gpu.py"
if ((${#WARM_PIDS[@]})); then
    t0=$(date +%s)
    wait "${WARM_PIDS[@]}"
    log "background compiles done (waited $(($(date +%s) - t0)) s more): $(grep -hs "^status:" /tmp/device-check-warm-*.log | tr "\n" " ")"
fi

# 4. Ceilings: copy bandwidth, matrix rates, grid-barrier latency.
# The barrier is timed last, in a child process with its own limit, inside this step's.
now=$(date +%s)
floors_limit=$((DEADLINE - now - $(r 265)))
((floors_limit > 75)) && floors_limit=75
step floors 75 $(r 265) "$PY -m benchmarks.floors --out $OUTDIR/floors.json --barrier-timeout $((floors_limit > 60 ? 40 : (floors_limit > 20 ? floors_limit - 20 : 5)))"
FLOORS_ARG=""
[ -s "$OUTDIR/floors.json" ] && FLOORS_ARG="--floors $OUTDIR/floors.json"

# 5. Tune a key shape (GRU, bf16, hidden 1024, batch 32); stored in $TRITON_RNN_CACHE_DIR.
# Three tiles: the default, the default without split-K (split_k=1: every warp
# multiplies all of K, what the kernels did before) and a weight-streaming tile. Every candidate is
# compiled twice (static check, then the timed launch), so the full set would not fit.
# (The quick grid below uses the default tiles, as an untuned user gets; LSTM 2048 is
# tuned at the end, with the time that is left.)
step tune_gru 45 $(r 230) "$PY -m triton_rnn.cli tune $TUNE_GRU_ARGS"

# 6. The quick grid against cuDNN. The JSON is rewritten after every shape; if the
# run dies (a lost CUDA context, a hang), a second run resumes with the rest.
HAVE_FLASH=0
$PY -c "import flashrnn" >/dev/null 2>&1 && HAVE_FLASH=1
# The quick grid comes first; then LSTMP (at least 50 s), CUDA graphs (at least 40 s),
# and FlashRNN gets what is left, at least 70 s if it is there.
FLASH_RESERVE=$(r $((HAVE_FLASH ? 180 : 110)))
now=$(date +%s)
bench_limit=$((DEADLINE - now - FLASH_RESERVE))
((bench_limit > 240)) && bench_limit=240
step bench_quick $bench_limit $FLASH_RESERVE "$UNTUNED $PY -m triton_rnn.cli bench --quick --no-flashrnn $FLOORS_ARG --out $OUTDIR/bench_quick.json --time-budget $((bench_limit > 60 ? bench_limit - 45 : bench_limit / 2))"
if [ "$LAST_RC" != 0 ] && [ "$LAST_RC" != skipped ] && [ -s "$OUTDIR/bench_quick.json" ]; then
    now=$(date +%s)
    left=$((DEADLINE - now - FLASH_RESERVE))
    if ((left > 60)); then
        step bench_quick_resume $left $FLASH_RESERVE "$UNTUNED $PY -m triton_rnn.cli bench --quick --no-flashrnn $FLOORS_ARG --out $OUTDIR/bench_quick.json --resume --time-budget $((left - 40))"
    fi
fi

# 7. LSTM with a projection (LSTMP, proj_size 256 of hidden 1024) against cuDNN's
# torch.nn.LSTM(proj_size=...): forward shapes first, at most 60 s.
LSTMP_RESERVE=$(r $((HAVE_FLASH ? 130 : 60)))
now=$(date +%s)
left=$((DEADLINE - now - LSTMP_RESERVE))
((left > 60)) && left=60
if ((HAVE_CUDA)); then
    step bench_lstmp $left $LSTMP_RESERVE "$UNTUNED $PY -m triton_rnn.cli bench --quick --cells lstm --hidden 1024 --proj 256 --batch 16,64 --seq-len 256 --dtypes bf16 --passes fwd,fwdbwd --impls triton,torch $FLOORS_ARG --out $OUTDIR/bench_lstmp.json --no-plot --time-budget $((left > 30 ? left - 20 : 5))"
else
    log "SKIP bench_lstmp: no CUDA device"
fi

# 8. CUDA graphs (the quick grid runs eagerly) on one shape, one direction and
# bidirectional: the two directions of a layer run on two streams, which the
# capture must join; triton_one_stream runs them one after the other, to show
# what the overlap buys.
GRAPH_RESERVE=$(r $((HAVE_FLASH ? 90 : 20)))
now=$(date +%s)
left=$((DEADLINE - now - GRAPH_RESERVE))
((left > 75)) && left=75
if ((HAVE_CUDA)); then
    step bench_graphs $left $GRAPH_RESERVE "$UNTUNED $PY -m triton_rnn.cli bench --quick --cells gru --hidden 1024 --batch 16 --passes fwdbwd --directions 2,1 --impls triton,triton_one_stream,torch --cuda-graphs $FLOORS_ARG --out $OUTDIR/bench_graphs.json --no-plot --time-budget $((left > 30 ? left - 20 : 5))"
else
    log "SKIP bench_graphs: no CUDA device"
fi

# 9. With the time left: LSTM 2048 bf16, forward. The default keeps 1536 of the 2048
# inputs of each 256 KB slice on-chip and streams the rest from L2; timed against
# streaming the whole slice.
TUNE_RESERVE=$(r $((HAVE_FLASH ? 80 : 15)))
now=$(date +%s)
left=$((DEADLINE - now - TUNE_RESERVE))
((left > 40)) && left=40
step tune_lstm2048 $left $TUNE_RESERVE "$PY -m triton_rnn.cli tune $TUNE_LSTM2048_ARGS"

# Every timing of both tunings (the cache keeps them all, not only the winners'), into the log.
step tuned_configs 20 $((TUNE_RESERVE > 20 ? TUNE_RESERVE - 20 : 0)) "$PY -m triton_rnn.cli cache export -"

# 10. FlashRNN on a few shapes (its CUDA kernels compile with nvcc on first use: slow).
if ((HAVE_FLASH)); then
    now=$(date +%s)
    left=$((DEADLINE - now - 20))
    step bench_flashrnn $left 20 "$UNTUNED $PY -m triton_rnn.cli bench --quick --cells lstm,gru --hidden 1024 --batch 64 --impls triton,torch,flashrnn $FLOORS_ARG --out $OUTDIR/bench_flashrnn.json --no-plot --time-budget $((left > 40 ? left - 30 : 5))"
else
    log "SKIP bench_flashrnn: flashrnn is not importable (carry its wheel under .whl/ to include it)"
fi

# 11. Summary (always), with the benchmark tables: one Python process renders them all
# (and bench_quick's plot again, from its final JSON), so the summary adds seconds, not
# one torch import per table.
rm -f "$OUTDIR"/*.tmp "$OUTDIR"/*.part
write_summary
timeout 90 "$PY" - "$OUTDIR" >>"$SUMMARY" 2>>"$LOG" <<'EOF'
import json, sys
from pathlib import Path

from triton_rnn import bench as B

out = Path(sys.argv[1])
for name in ("bench_quick", "bench_lstmp", "bench_graphs", "bench_flashrnn"):
    path = out / f"{name}.json"
    if not path.is_file() or path.stat().st_size == 0:
        continue
    print(f"## {name}\n", flush=True)
    try:
        doc = json.loads(path.read_text())
        md = B.markdown_report(doc)
    except Exception as e:  # a damaged file must not cost the other tables
        print(f"({path.name} unreadable: {type(e).__name__}: {e})\n", flush=True)
        continue
    print(md, flush=True)
    if name == "bench_quick":
        try:
            B.plot(doc, out / f"{name}.png")
        except Exception as e:  # the numbers matter more than the picture
            print(f"plot failed: {type(e).__name__}: {e}", file=sys.stderr)
EOF
rm -f "$STEPS_TSV"
n_files=$(find "$OUTDIR" -type f | wc -l)
((n_files > 8)) && log "WARNING: $n_files files in $OUTDIR; the device tool returns 8"
log "files: $(cd "$OUTDIR" && ls | tr '\n' ' ')"
cat "$SUMMARY"
exit 0

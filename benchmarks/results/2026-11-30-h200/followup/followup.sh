#!/usr/bin/env bash
# Follow-up GPU run after the device check: GPU tests of the split-K merge, split-K A/B
# on Triton 3.6 in one process per shape (tune), and a profile of the bidirectional
# GRU's eager overhead. Ends within ${FOLLOWUP_BUDGET_S:-215} s.
set -u
cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 MPLBACKEND=Agg TRITON_RNN_CACHE_DIR=/tmp/trc
unset TRITON_INTERPRET
O=${OUT:-/tmp/followup}; mkdir -p "$O"
START=$(date +%s); END=$((START + ${FOLLOWUP_BUDGET_S:-215}))
left() { echo $((END - $(date +%s) - $1)); }
run() {  # run NAME RESERVE MAX CMD...
    local name=$1 reserve=$2 max=$3; shift 3
    local lim; lim=$(left "$reserve"); ((lim > max)) && lim=$max
    if ((lim < 10)); then echo "SKIP $name (no time)" | tee -a "$O/followup.log"; return; fi
    echo "=== $name (limit ${lim}s, t=$(($(date +%s) - START))s): $*" | tee -a "$O/followup.log"
    timeout -k 5 "$lim" "$@" 2>&1 | tee -a "$O/followup.log" | tail -40
    echo "--- $name rc ${PIPESTATUS[0]} t=$(($(date +%s) - START))s" | tee -a "$O/followup.log"
}
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" | tee -a "$O/followup.log"
run gpu_tests 120 90 python3 -m pytest -m gpu -n 8 --timeout 75 --timeout-method thread -q -rfE -p no:cacheprovider --durations=5 tests/test_gpu.py
T="python3 -m triton_rnn.cli tune --dtype bfloat16 --hidden 1024 --backward --config 16,16,8,1,0,0,8 --config 16,16,8,1,0,0,4 --config 16,16,8,1,0,0,2"
run tune_gru_b8 80 35 $T --cell gru --batch 8
run tune_gru_b64 50 35 $T --cell gru --batch 64
run tune_lstm_b64 40 35 $T --cell lstm --batch 64
run cache_export 35 10 python3 -m triton_rnn.cli cache export "$O/autotune.json"
run profile_bi 0 60 python3 -m benchmarks.profile --cell gru --hidden 1024 --batch 16 --directions 2 --pass fwdbwd --impls triton,triton_one_stream,torch --iters 3 --warmup 2 --out "$O/traces"
ls -la "$O" "$O/traces" 2>/dev/null | tee -a "$O/followup.log"

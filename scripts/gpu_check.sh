#!/usr/bin/env bash
# GPU checks for a CUDA machine, as one short script: the CUDA tests (tests/test_cuda.py, skipped on CI's
# CPU), then `freqar bench` on the card for every full-size scenario. Each step has its own time limit, so
# one slow step cannot eat the rest. Needs python3 with a CUDA torch, numpy, pillow, safetensors, tqdm,
# pytest and matplotlib; freqar is taken from src/ (no install).
# Usage: bash scripts/gpu_check.sh OUTDIR        -> OUTDIR/{gpu.txt,cuda_tests.log,bench.log,bench.tgz}
#        ONLY="var-d16 hart-1024" bash scripts/gpu_check.sh OUTDIR   (those scenarios only)
set -u
OUT=${1:-gpu-check}
PY=${PYTHON:-python3}
mkdir -p "$OUT/bench"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    $PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
    nproc
} >"$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

timeout 180 $PY -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py 2>&1 | tee "$OUT/cuda_tests.log"

bench() {  # bench SCENARIO LIMIT_S ARGS...
    local name=$1 limit=$2
    shift 2
    [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $name "* ]] || return 0
    echo "== $name ($*)" | tee -a "$OUT/bench.log"
    local t0=$SECONDS
    local dir="$OUT/bench/$name"
    case " $* " in *" --batch 8 "*) dir="$dir-b8" ;; esac
    case " $* " in *" --signal entropy "*) dir="$dir-entropy" ;; esac
    timeout "$limit" $PY -m freqar bench --scenario "$name" --device cuda --quiet --out "$dir" "$@" \
        >>"$OUT/bench.log" 2>&1
    echo "   rc=$? in $((SECONDS - t0)) s" | tee -a "$OUT/bench.log"
    [ -f "$dir/bench.md" ] && cat "$dir/bench.md" >>"$OUT/bench.log"
}
bench var-d16 60 --methods dense,sparsevar,fastvar --taus 0.6 --budgets 0.5,0.3,0.15 --runs 5 --warmup 2
bench infinity-1024 60 --methods dense,sparsevar,fastvar --taus '' --budgets 0.5,0.3,0.15 --runs 3 --warmup 2
bench var-d16 60 --methods dense,sparsevar,fastvar --taus '' --budgets 0.5,0.3,0.15 --runs 3 --warmup 2 \
    --batch 8
# the entropy signal (`--accel auto` on emoji) taps no block but takes a softmax over the vocabulary
bench var-d16 60 --methods dense,sparsevar --taus '' --budgets 0.5,0.3,0.15 --runs 3 --warmup 2 --batch 8 \
    --signal entropy
# the CPU runs cut these to 1 and 2 blocks; the card holds the full depth
bench infinity-2b 90 --methods dense,sparsevar,fastvar --taus '' --budgets 0.5,0.3,0.15 --runs 3 --warmup 2 \
    --depth 32
bench hart-1024 60 --methods dense,sparsevar --taus '' --budgets 0.5 --runs 3 --warmup 2 --depth 16
bench far-b 60 --methods dense,farskip --taus '' --budgets 0.3,0.15 --runs 3 --warmup 2
bench far-b-100 90 --methods dense,farskip --taus '' --budgets 0.3,0.15 --runs 2 --warmup 1
bench far-emoji 60 --methods dense,farskip --taus 0.1,0.2,0.4 --budgets 0.5,0.3 --runs 5 --warmup 2
tar czf "$OUT/bench.tgz" -C "$OUT" bench

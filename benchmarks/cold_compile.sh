# Cold and warm compile of bench_dit.py rows, each row with caches of its own:
#   source benchmarks/device_setup.sh; bash benchmarks/cold_compile.sh flux OUT_DIR ROW [ROW...]
# A row's first process starts from empty Inductor and Triton caches (cold, as on a fresh
# machine: precompiled C++ headers included); its --warm-compile process finds them filled.
model=$1; out=$2; shift 2
for row in "$@"; do
    cache=$(mktemp -d /tmp/cold_compile_XXXX)
    TORCHINDUCTOR_CACHE_DIR=$cache TRITON_CACHE_DIR=$cache/triton \
        python3 "$(dirname "$0")/bench_dit.py" --model "$model" --rows "$row" --warm-compile "$row" \
        --profile "$row" --iters 10 --out "$out/$row.json" | tail -3
    rm -rf "$cache"
done

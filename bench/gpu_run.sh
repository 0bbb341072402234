#!/usr/bin/env bash
# The GPU half of issue 5 in one call of the device tool (a lent H100/H200, its own python3 with PyTorch,
# Triton and transformers; nothing installed here but wren itself, as source):
#
#   run(command="bash bench/gpu_run.sh", carry=[".gpu"], timeout_s=580)
#
# .gpu/whl holds the wheels wren needs that the device image lacks (gguf), downloaded here beforehand with
# the device README's `pip download` line. Everything lands in $OUT: the GPU tests' log, the kernel table
# (bench/tq_kernels.py) and the decode table (bench/gpu_decode.py) with its JSON rows, its log and one
# kernel profile a shape: 8 files, the most the device tool brings back. Each stage has its own time limit
# so that a hang in one still brings the others' results back.
set -u
OUT=${OUT:-/tmp/wren-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ls .gpu/whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .gpu/whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
if ! python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "no CUDA device here: this script is for a machine with a GPU (bench/gpu_decode.py --shapes tiny --device cpu"
    echo "runs the same code on a tiny shape)"
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv >"$OUT/gpu.txt" 2>&1
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" \
    >>"$OUT/gpu.txt" 2>&1

# 1. correctness first: every CUDA test (kernels, the captured step, quantized tiny models on the GPU)
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_triton_ops.py tests/test_graphs.py tests/test_turboquant.py \
    tests/test_tq_kernels.py -k "(gpu or cuda) and not bench_runs" >"$OUT/tests.log" 2>&1
echo "tests rc=$?" >>"$OUT/gpu.txt"

# 2. the kernels alone against cuBLAS bf16 on the 31B layer shapes, and the row GEMV with each lookup
timeout 120 python3 bench/tq_kernels.py --shapes 31b --batch 1 8 >"$OUT/kernels.md" 2>&1
echo "kernels rc=$?" >>"$OUT/gpu.txt"

# 3. the table: decode tokens/s, wren TQ4 vs transformers bf16, as a fraction of the limit
timeout 300 python3 bench/gpu_decode.py --json "$OUT/decode.json" --profile "$OUT" >"$OUT/decode.md" 2>"$OUT/decode.log"
echo "decode rc=$?" >>"$OUT/gpu.txt"
cat "$OUT/gpu.txt" "$OUT/decode.md"

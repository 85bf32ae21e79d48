#!/usr/bin/env bash
# The GPU measurements of issue 16 (part 4, and part 0 at the real depth), as one prepared run on a lent GPU
# machine (benchmarks/RESULTS.md, "GPU"). Each step has its own time limit and writes its log and JSON as it
# goes, so a step that fails or runs out of time costs only itself.
#
#   bash benchmarks/gpu_session.sh OUT_DIR [SELF_FORCING_CHECKOUT]
#
# Needs torch with CUDA, diffusers, PyAV (the engine imports it), transformers, accelerate, safetensors. The
# Self-Forcing checkout (github.com/guandeh17/Self-Forcing, e.g. `git archive HEAD wan | tar -x -C DIR`) is
# optional: without it the layer comparison is skipped.
set -u
out=${1:?usage: gpu_session.sh OUT_DIR [SELF_FORCING_CHECKOUT]}
sf=${2:-}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}

{ nvidia-smi -L; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  $py -c "import torch, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers',
diffusers.__version__, torch.cuda.get_device_name())"; } 2>&1 | tee "$out/machine.txt"

# 1. The real architecture at the real size, eager: every attention backend that runs, both decoders.
timeout 200 $py benchmarks/bench_gpu.py --decoders vae fast --warmup 1 --repeats 3 --budget-s 140 \
    --json "$out/bench_gpu.json" 2>&1 | tee "$out/bench_gpu.log"

# 2. Layers at the real depth and size against Self-Forcing's own CausalWanModel, the same calls, in lockstep.
if [ -n "$sf" ]; then
  timeout 130 $py benchmarks/bench_layers.py --device cuda --dtype bfloat16 --layers 30 --latent 60x104 --blocks 7 \
      --repeats 3 --before '' --self-forcing "$sf" --same-calls --clock wall --json "$out/layers.json" 2>&1 \
      | tee "$out/layers.log"
fi

# 3. torch.compile of the transformer (the warm-up pays the compilation).
timeout 170 $py benchmarks/bench_gpu.py --compile --backends native --decoders vae fast --warmup 1 --repeats 2 \
    --budget-s 120 --json "$out/bench_gpu_compile.json" 2>&1 | tee "$out/bench_gpu_compile.log"
exit 0

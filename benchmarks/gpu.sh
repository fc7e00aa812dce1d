#!/usr/bin/env bash
# The GPU checks of issue 13, in one go (a few minutes on an H100/H200):
# 1. decoding in bfloat16: Hugging Face generate against the plain preallocated-cache loop and lightningllm eager
#    and compiled (torch.compile mode="reduce-overhead": the one-token step replayed as a CUDA graph).
#    Target: lightningllm compiled >= 2x Hugging Face tokens/s.
# 2. training throughput and MFU at sequence 2048 (bf16-mixed, compile, FSDP on one GPU) of a GPT-2 124M and a
#    1.1B Llama shape against LitGPT's training step. Goals: MFU >= 40% on the 1B shape, more tokens/s than LitGPT.
#    LitGPT is installed beside lightningllm for the comparison only; the device reaches no package index, so
#    fetch its wheel here first (`pip download litgpt --no-deps -d wheels/`) and carry `wheels/`.
#
#   PYTHON=.venv/bin/python benchmarks/gpu.sh [--quick] [more benchmarks/decode.py options]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
export PYTHONPATH="$PWD:$PWD/plugins${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device here'; print(torch.cuda.get_device_name())"
"$PYTHON" benchmarks/decode.py --device cuda --dtype bfloat16 "$@"
if ! "$PYTHON" -c "import litgpt" 2>/dev/null && compgen -G "wheels/litgpt-*.whl" >/dev/null; then
    "$PYTHON" -m pip install --quiet --no-deps --target .litgpt wheels/litgpt-*.whl
    export PYTHONPATH="$PWD/.litgpt:$PYTHONPATH"
fi
"$PYTHON" benchmarks/train_mfu.py --shape gpt2-124m --batch_size 8
"$PYTHON" benchmarks/train_mfu.py --shape llama-1b --batch_size 4

#!/usr/bin/env bash
# The decoding benchmark on a GPU: bfloat16, Hugging Face generate against the plain preallocated-cache loop and
# lightningllm eager and compiled (torch.compile mode="reduce-overhead": the one-token step replayed as a CUDA graph).
# Target: lightningllm compiled >= 2x Hugging Face tokens/s.
#
#   PYTHON=.venv/bin/python benchmarks/gpu.sh [--quick] [more benchmarks/decode.py options]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
export PYTHONPATH="$PWD:$PWD/plugins${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device here'; print(torch.cuda.get_device_name())"
"$PYTHON" benchmarks/decode.py --device cuda --dtype bfloat16 "$@"

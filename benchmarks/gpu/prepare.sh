#!/usr/bin/env bash
# Run here, on the CPU host that reaches the package registry, before a GPU check: gathers what a GPU
# host without network lacks into two ignored folders for the device tool to carry (64 MiB in all):
#   .whl/          wheels for its Python (default 3.12; PY_VER=3.11 ...): the pinned transformers,
#                  datasets, peft and TRL 1.16 with their pure-Python helpers, and pytest for the
#                  GPU-only tests (the host's own torch, accelerate and numpy stay)
#   .gpu/smollm2/  SmolLM2's config, tokenizer and chat template, not its weights (over the carry
#                  limit): the GPU rows build the architecture with seeded weights (--random-init);
#                  a step's cost does not depend on the weights' values
# Then on the GPU host: benchmarks/gpu/run.sh (carry: .whl .gpu).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY_VER="${PY_VER:-3.12}"
SMOLLM2="${SMOLLM2:-models/base/smollm2-135m-instruct}"
PIP="${PIP:-.venv/bin/pip}"
[ -f "$SMOLLM2/config.json" ] || { echo "prepare.sh: $SMOLLM2 is missing; run 'make smollm2' first" >&2; exit 2; }
rm -rf .whl .gpu/smollm2
mkdir -p .whl .gpu/smollm2
"$PIP" download -q --no-deps --only-binary=:all: --python-version "$PY_VER" \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --dest .whl transformers==5.23.0 datasets==5.2.0 peft==0.21.2 trl==1.16.0 dill multiprocess xxhash \
  pytest==9.2.0 pluggy iniconfig pygments
for f in config.json generation_config.json tokenizer.json tokenizer_config.json special_tokens_map.json chat_template.jinja; do
  [ -f "$SMOLLM2/$f" ] && cp "$SMOLLM2/$f" .gpu/smollm2/
done
du -sh .whl .gpu

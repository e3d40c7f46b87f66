#!/usr/bin/env bash
# Run on a GPU host from the repository root, after benchmarks/gpu/prepare.sh here (carry .whl and
# .gpu): installs the carried wheels beside the host's torch, prints the versions, runs the tests
# that need a GPU (torch's varlen flash-attention kernel against the row-by-row path), then the
# SmolLM2 rows in bf16 beside TRL 1.16 with MFU and torch.profiler's per-op tables of each row's
# timed steps, then (VARLEN_CHECK=1, the default) our padding-free SFT full row at batch 128 with
# and without the varlen kernel. Everything lands in $OUT (the device tool's output folder;
# /tmp/gpu-out elsewhere). STAGES (default "sft rm dpo"), VARIANTS ("full lora"), BATCH (32) and
# EXTRA (more bench flags, e.g. "--padding-free") choose the rows; one row is one process, about a
# minute each on an H200.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-/tmp/gpu-out}"
mkdir -p "$OUT"
python -m pip install -q --no-deps --no-index .whl/*.whl
python -c "import torch, transformers, trl, peft, accelerate, datasets; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0)); print('transformers', transformers.__version__, 'trl', trl.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__, 'datasets', datasets.__version__)"
python -m pytest -p no:cacheprovider -q tests/rlhf_core/test_lever_parity.py -k "varlen" 2>&1 \
  | tee "$OUT/gpu-tests.txt" || echo "GPU TESTS FAILED: see $OUT/gpu-tests.txt"
# shellcheck disable=SC2086
python benchmarks/bench.py --model smollm2 --model-path .gpu/smollm2 --random-init --bf16 --threads 8 --trl \
  --stages ${STAGES:-sft rm dpo} --variants ${VARIANTS:-full lora} --batch-size "${BATCH:-32}" \
  --steps 10 --warmup 3 --records 512 --profile "$OUT/profile" --json "$OUT/rows.json" ${EXTRA:-} 2>&1 | tee "$OUT/bench.txt"
if [ "${VARLEN_CHECK:-1}" = 1 ]; then
  for flag in "" --no-varlen; do
    # shellcheck disable=SC2086
    python benchmarks/bench.py --model smollm2 --model-path .gpu/smollm2 --random-init --bf16 --threads 8 \
      --stages sft --variants full --batch-size 128 --padding-free --steps 10 --warmup 3 --records 2048 $flag \
      --json "$OUT/varlen${flag:+-off}.json" 2>&1 | tee "$OUT/varlen${flag:+-off}.txt"
  done
fi

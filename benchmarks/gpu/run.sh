#!/usr/bin/env bash
# Run on a GPU host from the repository root, after benchmarks/gpu/prepare.sh here (carry .whl and
# .gpu). A lent GPU comes with minutes, not hours, so the parts run most telling first, each in its
# own process tree, and a part that would start with less time left than it needs is skipped and
# named in $OUT/skipped.txt; a part that fails is named in $OUT/failed.txt and the next one runs.
#   1. install the carried wheels beside the host's torch; print the versions
#   2. gpu-tests: the tests that need a GPU (torch's varlen flash-attention kernel against the
#      row-by-row path; the chunked losses over the vocabulary against F.cross_entropy and plain
#      autograd, and the LM head inside the SFT loss against the head's logits, on CUDA's kernels)
#   3. sft-b256-free: SFT full at batch 256 padding-free (about 22k tokens a step), ours beside
#      TRL 1.16: the MFU target's row, steps large enough for the matrix products to matter (batch
#      128 held 25 GB of CUDA memory on the H200, so 256 fits an 80 GB H100 and 512 might not)
#   3b. sft-b256-free-compile: the same with torch.compile on both sides (ours: each decoder layer
#      but the last, `compile: true`; TRL torch_compile=True): fused kernels, fewer launches
#   4. sft-b128-free: the same at batch 128 (the H200 row of 2026-12-04: 2.2% MFU, 1.18x TRL), then
#      sft-b128-free-no-varlen: ours without the varlen kernel (what that lever buys)
#   5. sft-b256-profile: ours at batch 256 again under torch.profiler (per-op CUDA and CPU time)
#   6. sft-b32-profile: SFT full at batch 32, right-padded, ours beside TRL under the profiler (the
#      row that read 0.67x on the H200: where does our GPU time go?)
#   7. rest-b32: RM and DPO, full and LoRA, at batch 32
# The rows of parts 3, 3b, 4 and 7 run without the profiler, which slows the steps it watches.
# Each part writes its table to $OUT/NAME.txt and its rows to $OUT/NAME.json ($OUT: the device
# tool's output folder; /tmp/gpu-out elsewhere). BUDGET (seconds, default 480) bounds the whole
# script; PARTS (default: all eight, in this order) chooses parts; DRY_RUN=1 prints the commands
# without running them.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-/tmp/gpu-out}"
BUDGET="${BUDGET:-480}"
PARTS="${PARTS:-gpu-tests sft-b256-free sft-b256-free-compile sft-b128-free sft-b128-free-no-varlen sft-b256-profile sft-b32-profile rest-b32}"
START=$SECONDS
mkdir -p "$OUT"
BENCH=(python benchmarks/bench.py --model smollm2 --model-path .gpu/smollm2 --random-init --bf16 --threads 8
       --steps 10 --warmup 3)

# part NAME SECONDS CMD...: run CMD (its output to $OUT/NAME.txt) when NAME is in PARTS and at least
# SECONDS of the budget remain; CMD is stopped when the budget runs out.
part() {
  local name=$1 need=$2 left rc
  shift 2
  [[ " $PARTS " == *" $name "* ]] || return 0
  left=$((BUDGET - (SECONDS - START)))
  if ((left < need)); then
    echo "SKIPPED $name: ${left}s of BUDGET=${BUDGET}s left, it needs about ${need}s" | tee -a "$OUT/skipped.txt"
    return 0
  fi
  local cmd
  printf -v cmd '%q ' "$@"  # quoted as a shell would need it, so the printed command can be rerun
  echo "== $name, $((SECONDS - START))s in: ${cmd% }"
  if [ "${DRY_RUN:-0}" = 1 ]; then
    return 0
  fi
  timeout "$left" "$@" > >(tee "$OUT/$name.txt") 2>&1
  rc=$?
  ((rc == 0)) || echo "FAILED $name (exit $rc; 124: out of budget): see $OUT/$name.txt" | tee -a "$OUT/failed.txt"
}

if [ "${DRY_RUN:-0}" != 1 ]; then
  python -m pip install -q --no-deps --no-index .whl/*.whl || { echo "installing .whl failed" >&2; exit 2; }
  python -c "import torch, transformers, trl, peft, accelerate, datasets; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0)); print('transformers', transformers.__version__, 'trl', trl.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__, 'datasets', datasets.__version__)" \
    | tee "$OUT/versions.txt"
fi
part gpu-tests 60 python -m pytest -p no:cacheprovider -q tests/rlhf_core/test_lever_parity.py \
  tests/rlhf_core/test_losses.py tests/rlhf_core/test_logprobs.py -k "varlen or cuda"
part sft-b256-free 180 "${BENCH[@]}" --trl --stages sft --variants full --batch-size 256 --padding-free \
  --records 4096 --json "$OUT/sft-b256-free.json"
part sft-b256-free-compile 240 "${BENCH[@]}" --trl --compile --stages sft --variants full --batch-size 256 \
  --padding-free --records 4096 --json "$OUT/sft-b256-free-compile.json"
part sft-b128-free 150 "${BENCH[@]}" --trl --stages sft --variants full --batch-size 128 --padding-free \
  --records 2048 --json "$OUT/sft-b128-free.json"
part sft-b128-free-no-varlen 90 "${BENCH[@]}" --stages sft --variants full --batch-size 128 --padding-free \
  --records 2048 --no-varlen --json "$OUT/sft-b128-free-no-varlen.json"
part sft-b256-profile 90 "${BENCH[@]}" --stages sft --variants full --batch-size 256 --padding-free \
  --records 4096 --profile "$OUT/profile-sft-b256" --json "$OUT/sft-b256-profile.json"
part sft-b32-profile 150 "${BENCH[@]}" --trl --stages sft --variants full --batch-size 32 --records 512 \
  --profile "$OUT/profile-sft-b32" --json "$OUT/sft-b32-profile.json"
part rest-b32 300 "${BENCH[@]}" --trl --stages rm dpo --variants full lora --batch-size 32 --records 512 \
  --json "$OUT/rest-b32.json"
echo "done in $((SECONDS - START))s of BUDGET=${BUDGET}s"

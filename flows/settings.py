"""Environment defaults for running quietly, and for the training processes to run fast; a
variable the user set wins. `HF_HUB_OFFLINE` is not among them: a user may load a hub model; the
demo (Makefile) and the tests (conftest) set it."""
from __future__ import annotations

import os

QUIET_OFFLINE = {
    "GX_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # the first start of Prefect's ephemeral API on an empty database can take ~20 s here
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}

STAGE_ENV = {
    # glibc's malloc serves each allocation over 32 MB with a fresh mmap and unmaps it on free, so
    # every step faults in each vocabulary-sized tensor a 4 KB page at a time (SmolLM2's tied
    # embedding gradient, 49152 x 576 fp32 = 113 MB, is built three times per step: embedding
    # backward, LM-head backward, their sum): on 2 CPU cores zeroing one took 145-157 ms and the sum
    # 146-164 ms, against 5 ms for the same add into touched memory; 27,648 faults per such tensor.
    # Asking for transparent huge pages on those mappings (madvise) faults once per 2 MB: 567 faults.
    # SmolLM2 steps, ours, fp32, batch 2, 2026-12-04: SFT full 1714 -> 1556 ms, LoRA 944 -> 848 ms,
    # RM LoRA 1962 -> 1755 ms, DPO full 3830 -> 3692 ms, RM full and DPO LoRA within 2%, at the
    # same peak RSS. (Keeping the blocks in the heap instead, mmap_max=0, made SFT full 1278 ms but
    # let the heap grow to seven times a tensor freed and allocated in a loop: not taken.)
    # Set for the stage processes (scripts/stage.sh, whose default must equal this; `rlhf stage`'s
    # ranks inherit it; benchmark rows on both sides), not for the flow's servers. glibc (2.35 and
    # newer; older ones ignore it) reads it when a process starts; without THP the kernel ignores it.
    "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1",
}


def apply_defaults() -> None:
    for key, value in QUIET_OFFLINE.items():
        os.environ.setdefault(key, value)


def apply_stage_env() -> None:
    """`STAGE_ENV` for the processes started from here on (a value the user set wins)."""
    for key, value in STAGE_ENV.items():
        os.environ.setdefault(key, value)

"""Environment defaults for running quietly, and for the processes this one starts to run fast;
a variable the user set wins. `HF_HUB_OFFLINE` is not among them: a user may load a hub model; the
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


FAST_CHILDREN = {
    # glibc's malloc serves each allocation over 32 MB (a vocabulary-sized gradient or logits
    # tensor: SmolLM2's tied embedding gradient is 49152 x 576 fp32, 113 MB) with a fresh mmap,
    # and the first touch of each 4 KB page faults: on 2 CPU cores an add into such a tensor took
    # 22-169 ms against 5 ms into touched memory. Asking for transparent huge pages on those
    # mappings (madvise) faults once per 2 MB: 4-7 ms. SmolLM2 steps, ours, fp32, batch 2: SFT
    # full -9%, LoRA -10%, RM LoRA -10%, DPO full -4%, at the same peak RSS. glibc reads it when a
    # process starts, so it applies to the processes started from here (stages, ranks, benchmark
    # rows); glibc < 2.35 ignores it, and the kernel ignores madvise where THP is off.
    "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1",
}


def apply_defaults() -> None:
    for key, value in {**QUIET_OFFLINE, **FAST_CHILDREN}.items():
        os.environ.setdefault(key, value)

"""Environment defaults for running quietly; a variable the user set wins. `HF_HUB_OFFLINE` is
not among them: a user may load a hub model; the demo (Makefile) and the tests (conftest) set it."""
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


def apply_defaults() -> None:
    for key, value in QUIET_OFFLINE.items():
        os.environ.setdefault(key, value)

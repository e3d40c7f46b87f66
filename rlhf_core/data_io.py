"""Read the tokenised Arrow splits written by `encoding.tokenize_datasets`."""
from __future__ import annotations

from pathlib import Path

from rlhf_core.errors import TrainingError


def load_split(data_dir: Path, kind: str, split: str, required: bool | None = None):
    """The `kind/split` dataset, or None for a missing eval split; a missing train split raises."""
    from datasets import load_from_disk

    path = Path(data_dir) / kind / split
    required = split == "train" if required is None else required
    if not (path / "dataset_info.json").exists():
        if required:
            raise TrainingError(f"{path}: tokenised '{kind}' data is missing; run the tokenize stage first")
        return None
    ds = load_from_disk(str(path))
    if required and len(ds) == 0:
        raise TrainingError(f"{path}: tokenised '{kind}' data has no records")
    return ds

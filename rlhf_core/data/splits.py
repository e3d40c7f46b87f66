"""Read the tokenised Arrow splits written by `encoding.tokenize_datasets`, and check their shape.

The same check is the tokenize stage's post-condition (a bad split never replaces good data) and
every training stage's pre-condition (a split edited or produced elsewhere fails with the path,
row and rule, not with an index error from inside torch)."""
from __future__ import annotations

import json
import operator
from pathlib import Path

from rlhf_core import IGNORE_INDEX
from rlhf_core.errors import TrainingError

COLUMNS = {
    "pt": ("input_ids",),
    "sft": ("input_ids", "labels"),
    "preference": ("prompt_ids", "chosen_ids", "rejected_ids", "weight"),
    "prompts": ("prompt_ids",),
}


def _first(mask) -> int:
    import numpy as np

    return int(np.flatnonzero(mask)[0])


def _numpy(arr):
    """A numeric Arrow array without nulls as a numpy view of its data buffer. pyarrow's own
    `to_numpy` (and `pa.array`, `take`) import pandas, which a training process otherwise never needs."""
    import numpy as np
    import pyarrow as pa

    t = arr.type
    if arr.null_count or not (pa.types.is_integer(t) or pa.types.is_floating(t)):
        return arr.to_numpy(zero_copy_only=False)
    kind = "f" if pa.types.is_floating(t) else "i" if pa.types.is_signed_integer(t) else "u"
    dtype = np.dtype(f"{kind}{t.bit_width // 8}")
    return np.frombuffer(arr.buffers()[1], dtype=dtype, count=len(arr), offset=arr.offset * dtype.itemsize)


def check_split(ds, kind: str, where: str | Path, vocab_size: int | None = None,
                block_size: int | None = None) -> None:
    """Raise TrainingError unless `ds` has exactly the columns of `kind`, token-id lists that are
    non-empty and within `[0, vocab_size)`, labels aligned with input_ids (-100 or the input id),
    equal-length PT blocks (`block_size` if given) and finite positive preference weights."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    expected = COLUMNS[kind]
    if sorted(ds.column_names) != sorted(expected):
        raise TrainingError(f"{where}: has columns {sorted(ds.column_names)}, but '{kind}' data needs exactly "
                            f"{list(expected)} [columns]")
    if len(ds) == 0:
        return
    table = ds.table if isinstance(ds, Split) else ds.data.table  # or a datasets.Dataset

    def fail(row: int, message: str, rule: str):
        raise TrainingError(f"{where}: row {row}: {message} [{rule}]")

    lengths, flat = {}, {}
    for col in (c for c in expected if c != "weight"):
        arr = table[col].combine_chunks()
        is_list = pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)
        if not is_list or not pa.types.is_integer(arr.type.value_type):
            raise TrainingError(f"{where}: column '{col}' is {arr.type}, expected a list of integer token ids [dtype]")
        lengths[col] = n = _numpy(pc.list_value_length(arr))
        if (n == 0).any():
            fail(_first(n == 0), f"'{col}' is empty", "non_empty")
        flat[col] = ids = _numpy(pc.list_flatten(arr))
        bad = (ids < 0) & ~((ids == IGNORE_INDEX) & (col == "labels"))
        if vocab_size is not None:
            bad |= ids >= vocab_size
        if bad.any():
            i = _first(bad)
            limit = f"[0, {vocab_size})" if vocab_size is not None else "non-negative ids"
            fail(int(np.repeat(np.arange(len(n)), n)[i]),
                 f"'{col}' holds token id {int(ids[i])}, outside the tokenizer's {limit}", "token_range")
    if kind == "sft":  # per-row lengths first: only then do the flattened columns line up position by position
        n_in, n_lab = lengths["input_ids"], lengths["labels"]
        if (n_lab != n_in).any():
            i = _first(n_lab != n_in)
            fail(i, f"'labels' has {n_lab[i]} tokens but 'input_ids' has {n_in[i]}", "labels_aligned")
        labels = flat["labels"]
        wrong = (labels != IGNORE_INDEX) & (labels != flat["input_ids"])
        if wrong.any():
            fail(int(np.repeat(np.arange(len(n_lab)), n_lab)[_first(wrong)]),
                 "'labels' differs from 'input_ids' at an unmasked position", "labels_aligned")
        trained = np.add.reduceat(labels != IGNORE_INDEX, np.concatenate([[0], np.cumsum(n_lab)[:-1]]))
        if (trained == 0).any():
            fail(_first(trained == 0), "every label is masked (-100): nothing to train on", "labels_aligned")
    if kind == "pt":
        size = block_size if block_size is not None else int(lengths["input_ids"][0])
        if (lengths["input_ids"] != size).any():
            i = _first(lengths["input_ids"] != size)
            fail(i, f"block has {lengths['input_ids'][i]} tokens, expected block_size {size}", "block_size")
    if kind == "preference":
        w = _numpy(table["weight"].combine_chunks())
        bad = ~np.isfinite(w) | (w <= 0)
        if bad.any():
            fail(_first(bad), f"'weight' is {w[_first(bad)]}, must be finite and > 0", "weight")


class Split:
    """A tokenised split as one Arrow table, read with pyarrow alone: the part of
    `datasets.Dataset` the loops use (`len`, `column_names`, and indexing by row, by a list of rows,
    by a slice or by column name, which give Python values as a Dataset does). The training
    processes then import neither `datasets` nor pandas (which pyarrow's own conversions would
    import): 54 MB of resident memory per process, a tenth of the tiny PPO row's peak."""

    def __init__(self, table):
        self.table = table

    @property
    def column_names(self) -> list[str]:
        return list(self.table.column_names)

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, key):
        if isinstance(key, str):
            return self.table.column(key).to_pylist()
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step == 1:
                return self.table.slice(start, max(0, stop - start)).to_pydict()
            return self._rows(range(start, stop, step))
        if isinstance(key, (list, tuple, range)):
            return self._rows(key)
        return {k: v[0] for k, v in self._rows([key]).items()}

    def _rows(self, key) -> dict[str, list]:
        """The rows `key` (ints, negative from the end) as columns of Python values, row by row:
        pyarrow's `take` converts its indices through pandas."""
        n = len(self)
        rows = [operator.index(i) for i in key]
        if any(not -n <= i < n for i in rows):
            raise IndexError(f"rows {rows} of a split of {n} rows")
        out = {k: [] for k in self.table.column_names}
        for i in rows:
            for k, v in self.table.slice(i % n, 1).to_pydict().items():
                out[k].extend(v)
        return out


def read_split(path: Path) -> Split:
    """The Arrow files of a folder written by `Dataset.save_to_disk`, as listed in its state.json."""
    import pyarrow as pa

    state = json.loads((Path(path) / "state.json").read_text())
    if state.get("_indices_data_files"):
        raise ValueError("the split keeps an indices mapping; save it again flattened")
    # memory-mapped, as datasets reads them: the table's buffers keep the mapping alive
    tables = [pa.ipc.open_stream(pa.memory_map(str(Path(path) / f["filename"]))).read_all()
              for f in state["_data_files"]]
    if not tables:
        raise ValueError("state.json lists no data files")
    return Split(pa.concat_tables(tables) if len(tables) > 1 else tables[0])


def load_split(data_dir: Path, kind: str, split: str, required: bool | None = None,
               vocab_size: int | None = None) -> Split | None:
    """The checked `kind/split` data (`Split`), or None for a missing eval split; a missing train split raises."""
    path = Path(data_dir) / kind / split
    required = split == "train" if required is None else required
    if not (path / "dataset_info.json").exists():
        if required:
            raise TrainingError(f"{path}: tokenised '{kind}' data is missing; run the tokenize stage first")
        return None
    try:
        ds = read_split(path)
    except Exception as e:  # a truncated or foreign folder: name it instead of showing Arrow's traceback
        raise TrainingError(f"{path}: cannot read the tokenised '{kind}' data ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}); run the tokenize stage again") from None
    if required and len(ds) == 0:
        raise TrainingError(f"{path}: tokenised '{kind}' data has no records")
    check_split(ds, kind, path, vocab_size)
    return ds


def check_tokenized(out_dir: Path, vocab_size: int, block_size: int) -> None:
    """Post-condition of the tokenize stage: every split written under `out_dir`, read as the
    training stages read it (`read_split`), passes `check_split`."""
    for kind in COLUMNS:
        for split in ("train", "eval", "judge"):
            path = Path(out_dir) / kind / split
            if (path / "dataset_info.json").exists():
                check_split(read_split(path), kind, path, vocab_size, block_size if kind == "pt" else None)

"""Typed batches padded to the batch's longest sequence, and a resumable data order."""
from __future__ import annotations

from typing import Iterator, NamedTuple

import torch

from rlhf_core import IGNORE_INDEX


class LMBatch(NamedTuple):
    input_ids: torch.Tensor       # (B, T) right-padded
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor          # (B, T), -100 where not trained


class PairBatch(NamedTuple):
    """Chosen rows first, then rejected rows, so one forward scores both."""
    input_ids: torch.Tensor       # (2B, T) right-padded
    attention_mask: torch.Tensor  # (2B, T)
    labels: torch.Tensor          # (2B, T), -100 on prompt and padding
    weights: torch.Tensor         # (B,) pair weight (1 / pairs of its ranking)

    @property
    def tokens(self) -> int:
        """Real tokens in the batch, padding excluded."""
        return int(self.attention_mask.sum())


class PackedLMBatch(NamedTuple):
    """Padding-free: the rows laid end to end in one row of N = sum of their lengths, so no FLOP
    goes to padding. Positions restart at 0 where each row starts; given position ids and no
    attention mask, transformers attends only within a row (a block-diagonal causal mask)."""
    input_ids: torch.Tensor     # (1, N)
    position_ids: torch.Tensor  # (1, N)
    labels: torch.Tensor        # (1, N), -100 where not trained and at every row's first token


class PackedPairBatch(NamedTuple):
    """`PairBatch` without padding: its 2B rows (chosen first, then rejected) laid end to end in
    one row, positions restarting at each, as in `PackedLMBatch`."""
    input_ids: torch.Tensor     # (1, N)
    position_ids: torch.Tensor  # (1, N)
    labels: torch.Tensor        # (1, N), -100 on prompts and at every row's first token
    ends: torch.Tensor          # (2B,) index of each row's last token
    weights: torch.Tensor       # (B,)

    @property
    def tokens(self) -> int:
        return self.input_ids.shape[1]


class SharedPromptPairBatch(NamedTuple):
    """Pairs whose prompt goes through the model once: each pair is laid out as prompt, chosen,
    rejected, and the rejected tokens take the chosen tokens' positions (they continue the
    prompt) and attend to the prompt and to themselves, never to the chosen response. A prompt's
    hidden states do not depend on what follows it, so every reward equals the one of its row run
    alone, with fewer tokens through the model. One row per pair, right-padded (`one_row` False),
    or every pair end to end in one row; the custom mask is (R, 1, T, T), True where a query
    attends to a key (a padding query attends only to itself, so no softmax row is empty)."""
    input_ids: torch.Tensor       # (R, T)
    position_ids: torch.Tensor    # (R, T)
    attention_mask: torch.Tensor  # (R, 1, T, T) bool
    ends: torch.Tensor            # (2B,) flat index into input_ids.view(-1): chosen ends, then rejected ends
    weights: torch.Tensor         # (B,)
    real_tokens: int

    @property
    def tokens(self) -> int:
        return self.real_tokens


class PromptBatch(NamedTuple):
    input_ids: torch.Tensor       # (B, P) left-padded, ready for generate
    attention_mask: torch.Tensor  # (B, P)


def _pad(seqs: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    rows = [([value] * (width - len(s)) + s) if left else (s + [value] * (width - len(s))) for s in seqs]
    return torch.tensor(rows, dtype=torch.long)


def collate_lm(rows: dict, pad_id: int) -> LMBatch:
    """`rows` is a column dict (as `Dataset[indices]` returns) with input_ids and maybe labels."""
    ids = rows["input_ids"]
    labels = rows.get("labels") or ids
    mask = _pad([[1] * len(s) for s in ids], 0)
    return LMBatch(_pad(ids, pad_id), mask, _pad(labels, IGNORE_INDEX))


def _end_to_end(seqs: list[list[int]], labels: list[list[int]]) -> tuple[torch.Tensor, ...]:
    """(1, N) ids, positions and labels of `seqs` laid end to end. A row's first token is never a
    target (targets are labels[:, 1:]), so masking it changes nothing inside a row and stops the
    last token of one row from being trained to predict the first token of the next."""
    flat_ids, flat_pos, flat_labels = [], [], []
    for s, lab in zip(seqs, labels):
        flat_ids += s
        flat_pos += range(len(s))
        flat_labels += [IGNORE_INDEX] + list(lab[1:])
    return tuple(torch.tensor([x], dtype=torch.long) for x in (flat_ids, flat_pos, flat_labels))


def collate_lm_packed(rows: dict) -> PackedLMBatch:
    """`collate_lm` without padding (see `PackedLMBatch`)."""
    ids = rows["input_ids"]
    return PackedLMBatch(*_end_to_end(ids, rows.get("labels") or ids))


def _pair_rows(rows: dict) -> tuple[list[list[int]], list[list[int]], torch.Tensor]:
    """Prompt + response of every chosen row, then of every rejected row; labels mask the prompts."""
    seqs, labels = [], []
    for key in ("chosen_ids", "rejected_ids"):
        for p, r in zip(rows["prompt_ids"], rows[key]):
            seqs.append(p + r)
            labels.append([IGNORE_INDEX] * len(p) + r)
    return seqs, labels, torch.tensor(rows.get("weight") or [1.0] * len(rows["prompt_ids"]))


def collate_pairs(rows: dict, pad_id: int) -> PairBatch:
    seqs, labels, weights = _pair_rows(rows)
    mask = _pad([[1] * len(s) for s in seqs], 0)
    return PairBatch(_pad(seqs, pad_id), mask, _pad(labels, IGNORE_INDEX), weights)


def collate_pairs_packed(rows: dict) -> PackedPairBatch:
    """`collate_pairs` without padding (see `PackedPairBatch`)."""
    seqs, labels, weights = _pair_rows(rows)
    ends = torch.tensor([len(s) for s in seqs]).cumsum(0) - 1
    return PackedPairBatch(*_end_to_end(seqs, labels), ends, weights)


PROMPT, CHOSEN, REJECTED = 0, 1, 2


def collate_pairs_shared(rows: dict, pad_id: int, one_row: bool) -> SharedPromptPairBatch:
    """`collate_pairs` with each prompt computed once (see `SharedPromptPairBatch`)."""
    pairs = list(zip(rows["prompt_ids"], rows["chosen_ids"], rows["rejected_ids"]))
    groups = [list(range(len(pairs)))] if one_row else [[k] for k in range(len(pairs))]
    ids, pos, pair, part, c_ends, r_ends = [], [], [], [], [], []
    for g in groups:
        row_ids, row_pos, row_pair, row_part = [], [], [], []
        for k in g:
            p, c, r = pairs[k]
            row_ids += p + c + r
            row_pos += [*range(len(p) + len(c)), *range(len(p), len(p) + len(r))]
            row_pair += [k] * (len(p) + len(c) + len(r))
            row_part += [PROMPT] * len(p) + [CHOSEN] * len(c) + [REJECTED] * len(r)
            c_ends.append((len(ids), len(row_ids) - len(r) - 1))
            r_ends.append((len(ids), len(row_ids) - 1))
        for out, row in ((ids, row_ids), (pos, row_pos), (pair, row_pair), (part, row_part)):
            out.append(row)
    width = max(map(len, ids))
    pair_t, part_t = _pad(pair, -1), _pad(part, -1)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    same_pair = (pair_t[:, :, None] == pair_t[:, None, :]) & (pair_t[:, None, :] >= 0)
    visible = (part_t[:, None, :] == PROMPT) | (part_t[:, :, None] == part_t[:, None, :])
    pad_self = (pair_t < 0)[:, :, None] & torch.eye(width, dtype=torch.bool)
    mask = ((causal & same_pair & visible) | pad_self)[:, None]
    ends = torch.tensor([r * width + t for r, t in c_ends + r_ends])
    weights = torch.tensor(rows.get("weight") or [1.0] * len(pairs))
    return SharedPromptPairBatch(_pad(ids, pad_id), _pad(pos, 0), mask, ends, weights, sum(map(len, ids)))


def collate_pair_batch(rows: dict, pad_id: int, padding_free: bool,
                       share_prompt: bool = False) -> PairBatch | PackedPairBatch | SharedPromptPairBatch:
    if share_prompt:
        return collate_pairs_shared(rows, pad_id, one_row=padding_free)
    return collate_pairs_packed(rows) if padding_free else collate_pairs(rows, pad_id)


def collate_prompts(rows: dict, pad_id: int) -> PromptBatch:
    ids = rows["prompt_ids"]
    return PromptBatch(_pad(ids, pad_id, left=True), _pad([[1] * len(s) for s in ids], 0, left=True))


def index_batches(n: int, batch_size: int, seed: int, start: int = 0) -> Iterator[list[int]]:
    """Endless micro-batches of indices: a seeded permutation per epoch, the tail dropped when
    n >= batch_size. Starting at micro-batch `start` replays exactly the order a run would have
    reached, so a resumed run sees the same data as an uninterrupted one."""
    if n == 0:
        raise ValueError("empty dataset")
    per_epoch = max(1, n // batch_size)
    epoch, k = divmod(start, per_epoch)
    while True:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
        for j in range(k, per_epoch):
            yield perm[j * batch_size:(j + 1) * batch_size]
        epoch, k = epoch + 1, 0

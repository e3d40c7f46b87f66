"""Reductions restricted to the positions a mask selects.

`mask` is a bool or 0/1 tensor broadcastable to `x` (normally the same shape). Positions where
the mask is 0 never influence a result, even if they hold NaN-free garbage values.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

_WHITEN_EPS = 1e-8


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of `x` over the masked positions.

    x, mask: same shape (e.g. (B, T)). dim=None reduces everything to a 0-dim tensor; otherwise
    reduces `dim` only (e.g. dim=1 gives (B,)).
    """
    m = mask.to(x.dtype)
    if dim is None:
        return (x * m).sum()
    return (x * m).sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over the masked positions: sum(x * m) / sum(m).

    x, mask: same shape. dim=None gives a 0-dim tensor, else the shape of `x` without `dim`.
    A row (or whole tensor) with an empty mask yields NaN (0/0), which callers should avoid.
    """
    m = mask.to(x.dtype)
    if dim is None:
        return (x * m).sum() / m.sum()
    return (x * m).sum(dim=dim) / m.sum(dim=dim)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of `x` over all masked positions, as a 0-dim tensor.

    With unbiased=True applies Bessel's correction n / (n - 1) and needs n = mask.sum() >= 2.
    """
    m = mask.to(x.dtype)
    n = m.sum()
    mean = (x * m).sum() / n
    var = (((x - mean) ** 2) * m).sum() / n
    if unbiased:
        if n < 2:
            raise ValueError(
                f"masked_var(unbiased=True) needs at least 2 masked positions, got {int(n.item())}"
            )
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  total: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Normalise `x` to zero mean, unit (unbiased) variance over the masked positions.

    x, mask: same shape (e.g. advantages (B, T)). Returns the same shape:
    (x - mean) * rsqrt(var + 1e-8); with shift_mean=False the mean is added back (only the
    scale changes). Positions outside the mask are 0 in the output.
    total: sums a 0-dim tensor over processes, so that with several processes (each holding its
    rows of one global batch) mean and variance are the global batch's; None: these rows alone.
    """
    total = total or (lambda t: t)
    m = mask.to(x.dtype)
    n = total(m.sum())
    mean = total((x * m).sum()) / n
    if n < 2:
        raise ValueError(f"masked_whiten needs at least 2 masked positions, got {int(n.item())}")
    var = total((((x - mean) ** 2) * m).sum()) / n * n / (n - 1)  # Bessel's correction, as masked_var
    out = (x - mean) * torch.rsqrt(var + _WHITEN_EPS)
    if not shift_mean:
        out = out + mean
    return out * m

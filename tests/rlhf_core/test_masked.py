from __future__ import annotations

import numpy as np
import pytest
import torch

from rlhf_core.ops.masked import masked_mean, masked_sum, masked_var, masked_whiten


def test_masked_sum_and_mean_by_hand():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, -50.0, 5.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    assert masked_sum(x, mask).item() == pytest.approx(11.0)
    assert masked_mean(x, mask).item() == pytest.approx(11.0 / 4)
    torch.testing.assert_close(masked_sum(x, mask, dim=1), torch.tensor([3.0, 8.0]))
    torch.testing.assert_close(masked_mean(x, mask, dim=1), torch.tensor([1.5, 4.0]))
    torch.testing.assert_close(masked_mean(x, mask.bool(), dim=0), torch.tensor([2.0, 2.0, 5.0]))


def test_masked_var_matches_numpy_ddof():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 6, generator=g)
    mask = torch.rand(3, 6, generator=g) > 0.4
    sel = x[mask].numpy().astype(np.float64)
    assert masked_var(x, mask).item() == pytest.approx(np.var(sel, ddof=1), rel=1e-5)
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(np.var(sel, ddof=0), rel=1e-5)


def test_masked_var_unbiased_needs_two():
    x = torch.tensor([1.0, 2.0, 3.0])
    with pytest.raises(ValueError):
        masked_var(x, torch.tensor([0, 1, 0]))
    assert masked_var(x, torch.tensor([0, 1, 0]), unbiased=False).item() == 0.0


def test_masked_whiten_matches_numpy():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 5, generator=g) * 3 + 2
    mask = torch.tensor(
        [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool
    )
    sel = x[mask].numpy().astype(np.float64)
    mean, var = sel.mean(), sel.var(ddof=1)
    expected = (sel - mean) / np.sqrt(var + 1e-8)

    out = masked_whiten(x, mask)
    np.testing.assert_allclose(out[mask].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert torch.all(out[~mask] == 0)
    # whitened values have zero mean and unit unbiased variance over the mask
    assert masked_mean(out, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert masked_var(out, mask).item() == pytest.approx(1.0, rel=1e-5)

    kept = masked_whiten(x, mask, shift_mean=False)
    np.testing.assert_allclose(kept[mask].numpy(), expected + mean, rtol=1e-5, atol=1e-6)
    assert torch.all(kept[~mask] == 0)

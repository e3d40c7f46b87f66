"""Per-token KL estimates between the policy and the reference model, and KL-coefficient control."""
from __future__ import annotations

import torch


def kl_penalty(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1"
) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples drawn from pi.

    logprobs, ref_logprobs: (B, T) log-probs of the sampled tokens. Returns (B, T).
    k1 = log pi - log pi_ref (unbiased, high variance, can be negative).
    k3 = (r - 1) - log r with r = pi_ref / pi (unbiased, always >= 0), from J. Schulman,
    "Approximating KL divergence" (2020).
    """
    if estimator == "k1":
        return logprobs - ref_logprobs
    if estimator == "k3":
        log_r = ref_logprobs - logprobs
        return torch.expm1(log_r) - log_r  # (r - 1) - log r
    raise ValueError(f"unknown KL estimator {estimator!r}; expected 'k1' or 'k3'")


class FixedKLController:
    """A constant KL coefficient; `update` is a no-op."""

    def __init__(self, init_coef: float):
        self.value = float(init_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Keep the coefficient unchanged."""

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, d: dict) -> None:
        self.value = float(d["value"])


class AdaptiveKLController:
    """Proportional controller steering the observed KL towards `target`.

    Ziegler et al. 2019 eq. 2: e = clip(KL / target - 1, -0.2, 0.2);
    beta <- beta * (1 + e * n_steps / horizon).
    """

    def __init__(self, init_coef: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got {target} and {horizon}")
        self.value = float(init_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Adjust `value` after `n_steps` samples (or steps) that showed mean KL `current_kl`."""
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, d: dict) -> None:
        self.value = float(d["value"])
        self.target = float(d.get("target", self.target))
        self.horizon = float(d.get("horizon", self.horizon))


def make_kl_controller(
    kind: str, init_coef: float, target: float | None = None, horizon: float | None = None
) -> FixedKLController | AdaptiveKLController:
    """Build a "fixed" or "adaptive" KL controller; target and horizon are needed for adaptive."""
    if kind == "fixed":
        return FixedKLController(init_coef)
    if kind == "adaptive":
        if target is None or horizon is None:
            raise ValueError("adaptive KL controller needs both target and horizon")
        return AdaptiveKLController(init_coef, target, horizon)
    raise ValueError(f"unknown KL controller kind {kind!r}; expected 'fixed' or 'adaptive'")

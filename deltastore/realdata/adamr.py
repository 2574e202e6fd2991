"""AdamR: Adam with decoupled decay toward the pre-trained weights (DAREx-L2 / DAREx-L1).

From Deng et al., "DARE the Extreme: Revisiting Delta-Parameter Pruning for Fine-Tuned Models"
(ICLR 2025, arXiv 2410.09344). Plain AdamW decays weights toward zero; AdamR decays them toward a
frozen copy `theta_pre` of the weights it was built on, which keeps the delta `theta - theta_pre`
small and so easier to prune at high drop rates. Per step, with Adam's bias-corrected moments:

    s     = sqrt(mean of v_hat over every element of every parameter)   (1 where that is 0)
    theta = theta - reg_lambda * lr / s * (theta - theta_pre)           (L2; L1 uses sign(...))
    theta = theta - lr / (1 - beta1^t) * m / (sqrt(v_hat) + eps)

Dividing the decay by the global scale `s` makes its strength relative to the typical Adam step.
With `reg_lambda = 0` the update is exactly Adam without weight decay.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

NORMS = ("l2", "l1")


class AdamR(torch.optim.Optimizer):
    """Adam plus a decay of each parameter toward its value at construction time.

    `theta_pre` is one frozen copy per parameter, taken when the optimizer is built and kept in
    the optimizer state, so `state_dict()` / `load_state_dict()` resume a run exactly even when the
    resumed optimizer is built on already fine-tuned weights.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        *,
        reg_lambda: float = 1e-4,
        norm: str = "l2",
    ) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr!r}")
        if not all(0 <= beta < 1 for beta in betas) or len(betas) != 2:
            raise ValueError(f"betas must be two values in [0, 1), got {betas!r}")
        if not eps >= 0:
            raise ValueError(f"eps must be non-negative, got {eps!r}")
        if not reg_lambda >= 0:
            raise ValueError(f"reg_lambda must be non-negative, got {reg_lambda!r}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "reg_lambda": reg_lambda, "norm": norm}
        super().__init__(params, defaults)
        self.last_scale = 1.0  # the global s of the latest step, for logging

        # One frozen copy of the starting weights, taken once here, not every step.
        for group in self.param_groups:
            for param in group["params"]:
                self.state[param]["theta_pre"] = param.detach().clone(memory_format=torch.preserve_format)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        # 1. Update the moments of every parameter that has a gradient and gather sum(v_hat).
        active: list[tuple[dict, torch.Tensor]] = []
        v_hat_sum = 0.0
        v_hat_count = 0
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise TypeError("AdamR does not support sparse gradients; use dense embeddings")
                state = self.state[param]
                if "step" not in state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["step"] += 1
                state["exp_avg"].lerp_(param.grad, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(param.grad, param.grad, value=1 - beta2)
                bias_correction2 = 1 - beta2 ** state["step"]
                # float64 sum: the mean runs over ~1e8 elements and float32 loses digits there.
                v_hat_sum += state["exp_avg_sq"].sum(dtype=torch.float64).item() / bias_correction2
                v_hat_count += param.numel()
                active.append((group, param))

        # 2. The global scale s.
        scale = math.sqrt(v_hat_sum / v_hat_count) if v_hat_count else 0.0
        if scale == 0.0:
            scale = 1.0
        self.last_scale = scale

        # 3. Decay toward theta_pre, then the Adam step, per parameter.
        for group, param in active:
            state = self.state[param]
            beta1, beta2 = group["betas"]
            lr = group["lr"]
            if group["reg_lambda"] > 0:
                offset = param - state["theta_pre"]
                if group["norm"] == "l1":
                    offset = offset.sign_()
                param.add_(offset, alpha=-group["reg_lambda"] * lr / scale)
                del offset

            bias_correction1 = 1 - beta1 ** state["step"]
            bias_correction2_sqrt = math.sqrt(1 - beta2 ** state["step"])
            denom = (state["exp_avg_sq"].sqrt() / bias_correction2_sqrt).add_(group["eps"])
            param.addcdiv_(state["exp_avg"], denom, value=-lr / bias_correction1)
        return loss

"""AdamR against torch's Adam and AdamW on small real parameters."""

from __future__ import annotations

import pytest
import torch

from deltastore.realdata.adamr import AdamR


def _params(seed: int) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(7, 5, generator=generator)),
        torch.nn.Parameter(torch.randn(3, generator=generator)),
    ]


def _loss(params: list[torch.Tensor], step: int) -> torch.Tensor:
    # A different quadratic target each step, so gradients change direction.
    target = torch.sin(torch.arange(35, dtype=torch.float32) + step).reshape(7, 5)
    return ((params[0] - target) ** 2).sum() + (params[1] ** 4).sum()


def _run(optimizer_cls, params, steps: int, **kwargs) -> list[torch.Tensor]:
    optimizer = optimizer_cls(params, **kwargs)
    for step in range(steps):
        optimizer.zero_grad()
        _loss(params, step).backward()
        optimizer.step()
    return [p.detach().clone() for p in params]


def test_zero_lambda_matches_adam():
    ours, reference = _params(0), _params(0)
    optimizer = AdamR(ours, lr=0.01, reg_lambda=0.0)
    adam = torch.optim.Adam(reference, lr=0.01, weight_decay=0.0)
    for step in range(25):
        for opt, params in ((optimizer, ours), (adam, reference)):
            opt.zero_grad()
            _loss(params, step).backward()
            opt.step()
        for mine, theirs in zip(ours, reference, strict=True):
            torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_large_lambda_stays_closer_than_adamw(norm):
    start = [p.detach().clone() for p in _params(1)]
    regularised = _run(AdamR, _params(1), 40, lr=0.01, reg_lambda=0.5, norm=norm)
    adamw = _run(torch.optim.AdamW, _params(1), 40, lr=0.01, weight_decay=0.5)
    distance_adamr = sum((p - s).norm() ** 2 for p, s in zip(regularised, start, strict=True))
    distance_adamw = sum((p - s).norm() ** 2 for p, s in zip(adamw, start, strict=True))
    assert distance_adamr < 0.5 * distance_adamw


def test_decay_pulls_toward_start_not_zero():
    # With no gradient signal the Adam step is zero, so only the decay toward theta_pre acts.
    param = torch.nn.Parameter(torch.full((4, 3), 2.0))
    optimizer = AdamR([param], lr=0.1, reg_lambda=1.0)
    with torch.no_grad():
        param.add_(1.0)  # moved away from theta_pre = 2.0
    param.grad = torch.zeros_like(param)
    optimizer.step()
    assert torch.all(param < 3.0)
    assert torch.all(param > 2.0)
    assert optimizer.last_scale == 1.0  # all v_hat are zero, so s falls back to 1


def test_theta_pre_is_copied_once():
    param = torch.nn.Parameter(torch.ones(5))
    optimizer = AdamR([param], lr=0.1, reg_lambda=0.1)
    with torch.no_grad():
        param.mul_(3.0)
    assert torch.equal(optimizer.state[param]["theta_pre"], torch.ones(5))
    assert optimizer.state[param]["theta_pre"].data_ptr() != param.data_ptr()


def test_state_dict_round_trip_resumes_exactly():
    straight = _params(2)
    optimizer = AdamR(straight, lr=0.01, reg_lambda=0.2)
    for step in range(10):
        optimizer.zero_grad()
        _loss(straight, step).backward()
        optimizer.step()

    # The same 10 steps split 6 + 4, with a fresh optimizer built on the moved weights.
    first = _params(2)
    optimizer_a = AdamR(first, lr=0.01, reg_lambda=0.2)
    for step in range(6):
        optimizer_a.zero_grad()
        _loss(first, step).backward()
        optimizer_a.step()
    saved = optimizer_a.state_dict()
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in first]
    optimizer_b = AdamR(resumed, lr=0.01, reg_lambda=0.2)
    optimizer_b.load_state_dict(saved)
    for step in range(6, 10):
        optimizer_b.zero_grad()
        _loss(resumed, step).backward()
        optimizer_b.step()
    for mine, theirs in zip(resumed, straight, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs",
    [{"lr": 0.0}, {"reg_lambda": -1.0}, {"norm": "l3"}, {"betas": (0.9, 1.0)}, {"eps": -1e-8}],
)
def test_invalid_settings_rejected(kwargs):
    with pytest.raises(ValueError):
        AdamR(_params(0), **kwargs)

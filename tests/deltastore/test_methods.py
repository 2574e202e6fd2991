"""Pruning methods on synthetic deltas with odd shapes."""

from __future__ import annotations

import math

import pytest
import torch

from deltastore.methods import (
    METHODS,
    PruneOptions,
    PruningParameterError,
    keep_count,
    prune,
    random_keep_mask,
    validate_drop_rate,
    validate_q,
)


def random_delta(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator) * 0.01


def dense(entry) -> torch.Tensor:
    out = torch.zeros(math.prod(entry.shape), dtype=torch.float32)
    out[entry.indices] = entry.values
    return out.reshape(entry.shape)


def test_registry_lists_every_method():
    assert set(METHODS) == {"dare", "darex-q", "magnitude", "wanda"}
    for name, method in METHODS.items():
        assert method.name == name
        assert method.source
        assert "drop_rate" in method.parameters


@pytest.mark.parametrize("drop_rate", [0.0, 0.5, 0.9, 0.99, 0.999])
def test_magnitude_keeps_exact_count(drop_rate):
    delta = random_delta((37, 53))
    entry = prune(delta, method="magnitude", name="w", options=PruneOptions(drop_rate=drop_rate))
    expected = round(37 * 53 * (1 - drop_rate))
    assert entry.indices.numel() == expected
    assert entry.values.numel() == expected


def test_magnitude_keeps_largest_entries():
    delta = random_delta((29, 31))
    entry = prune(delta, method="magnitude", name="w", options=PruneOptions(drop_rate=0.8))
    kept_min = entry.values.abs().min()
    dropped = torch.ones(delta.numel(), dtype=torch.bool)
    dropped[entry.indices] = False
    assert delta.reshape(-1)[dropped].abs().max() <= kept_min


def test_magnitude_values_unscaled_by_default():
    delta = random_delta((13, 17))
    entry = prune(delta, method="magnitude", name="w", options=PruneOptions(drop_rate=0.5))
    assert torch.equal(entry.values, delta.reshape(-1)[entry.indices])


def test_magnitude_rescale_option():
    delta = random_delta((13, 17))
    options = PruneOptions(drop_rate=0.75, rescale=True)
    entry = prune(delta, method="magnitude", name="w", options=options)
    torch.testing.assert_close(entry.values, delta.reshape(-1)[entry.indices] * 4.0)


def test_indices_sorted_unique_int64():
    delta = random_delta((19, 23))
    for method in ("dare", "magnitude"):
        entry = prune(delta, method=method, name="w", options=PruneOptions(drop_rate=0.6))
        assert entry.indices.dtype == torch.int64
        assert entry.values.dtype == torch.float32
        assert torch.equal(entry.indices, torch.unique(entry.indices))
        assert entry.shape == (19, 23)


@pytest.mark.parametrize("drop_rate", [0.1, 0.5, 0.9, 0.99])
def test_dare_keep_fraction_within_binomial_bounds(drop_rate):
    delta = random_delta((211, 97))
    n = delta.numel()
    entry = prune(delta, method="dare", name="w", options=PruneOptions(drop_rate=drop_rate, seed=3))
    mean = n * (1 - drop_rate)
    std = math.sqrt(n * drop_rate * (1 - drop_rate))
    assert abs(entry.indices.numel() - mean) <= 5 * std


def test_dare_is_unbiased_on_average():
    delta = random_delta((7, 11))
    total = torch.zeros_like(delta)
    trials = 4000
    for seed in range(trials):
        total += dense(prune(delta, method="dare", name="w", options=PruneOptions(drop_rate=0.5, seed=seed)))
    mean = total / trials
    # Each averaged entry has standard deviation |delta| / sqrt(trials); allow 5 of them.
    tolerance = 5 * delta.abs() / math.sqrt(trials) + 1e-7
    assert torch.all((mean - delta).abs() <= tolerance)


def test_dare_keep_fraction_unbiased_over_seeds():
    delta = random_delta((13, 17))
    trials = 300
    kept_counts = [
        prune(delta, method="dare", name="w", options=PruneOptions(drop_rate=0.8, seed=seed)).indices.numel()
        for seed in range(trials)
    ]
    n = delta.numel()
    mean_fraction = sum(kept_counts) / (trials * n)
    # The mean of 300 binomial fractions has standard deviation sqrt(0.2 * 0.8 / (n * 300)); allow 5.
    assert abs(mean_fraction - 0.2) <= 5 * math.sqrt(0.2 * 0.8 / (n * trials))


def test_dare_rescales_kept_values():
    delta = random_delta((17, 19))
    entry = prune(delta, method="dare", name="w", options=PruneOptions(drop_rate=0.75, seed=1))
    torch.testing.assert_close(entry.values, delta.reshape(-1)[entry.indices] * 4.0)


@pytest.mark.parametrize("drop_rate", [0.0, 0.3, 0.9, 0.99])
def test_darex_q_at_lower_end_equals_dare(drop_rate):
    delta = random_delta((41, 23))
    dare = prune(delta, method="dare", name="layer.w", options=PruneOptions(drop_rate=drop_rate, seed=7))
    darex = prune(
        delta,
        method="darex-q",
        name="layer.w",
        options=PruneOptions(drop_rate=drop_rate, seed=7, q=1 - drop_rate),
    )
    assert torch.equal(dare.indices, darex.indices)
    assert torch.equal(dare.values.view(torch.int32), darex.values.view(torch.int32))


def test_darex_q_divides_by_q():
    delta = random_delta((17, 19))
    options = PruneOptions(drop_rate=0.9, seed=2, q=0.4)
    entry = prune(delta, method="darex-q", name="w", options=options)
    torch.testing.assert_close(entry.values, delta.reshape(-1)[entry.indices] / 0.4)


def test_mask_reproducible_and_independent_per_tensor():
    first = random_keep_mask((31, 37), drop_rate=0.5, seed=0, name="a")
    again = random_keep_mask((31, 37), drop_rate=0.5, seed=0, name="a")
    other_name = random_keep_mask((31, 37), drop_rate=0.5, seed=0, name="b")
    other_seed = random_keep_mask((31, 37), drop_rate=0.5, seed=1, name="a")
    assert torch.equal(first, again)
    assert not torch.equal(first, other_name)
    assert not torch.equal(first, other_seed)


def test_mask_does_not_depend_on_q():
    delta = random_delta((23, 29))
    low = prune(delta, method="darex-q", name="w", options=PruneOptions(drop_rate=0.9, seed=5, q=0.1))
    high = prune(delta, method="darex-q", name="w", options=PruneOptions(drop_rate=0.9, seed=5, q=1.0))
    assert torch.equal(low.indices, high.indices)


def test_wanda_keeps_exact_count_per_row():
    delta = random_delta((13, 41))
    norms = torch.rand(41, generator=torch.Generator().manual_seed(4)) + 0.1
    entry = prune(delta, method="wanda", name="w", options=PruneOptions(drop_rate=0.7, input_norms=norms))
    rows = entry.indices // 41
    per_row = torch.bincount(rows, minlength=13)
    assert torch.all(per_row == keep_count(41, 0.7))


def test_wanda_uses_input_norms():
    # Equal |delta| everywhere: only the norms decide which columns survive.
    delta = torch.full((5, 9), 0.01)
    norms = torch.arange(1, 10, dtype=torch.float32)
    entry = prune(delta, method="wanda", name="w", options=PruneOptions(drop_rate=2 / 3, input_norms=norms))
    columns = set((entry.indices % 9).tolist())
    assert columns == {6, 7, 8}


def test_wanda_rejects_wrong_norm_length():
    delta = random_delta((5, 9))
    options = PruneOptions(drop_rate=0.5, input_norms=torch.ones(8))
    with pytest.raises(PruningParameterError, match="9 input features"):
        prune(delta, method="wanda", name="w", options=options)


def test_wanda_without_norms_raises():
    with pytest.raises(PruningParameterError, match="calibration"):
        prune(random_delta((5, 9)), method="wanda", name="w", options=PruneOptions(drop_rate=0.5))


@pytest.mark.parametrize("method", ["dare", "magnitude"])
def test_drop_rate_zero_keeps_everything(method):
    delta = random_delta((11, 13))
    entry = prune(delta, method=method, name="w", options=PruneOptions(drop_rate=0.0))
    assert torch.equal(dense(entry), delta)


def test_wanda_drop_rate_zero_keeps_everything():
    delta = random_delta((11, 13))
    options = PruneOptions(drop_rate=0.0, input_norms=torch.ones(13))
    assert torch.equal(dense(prune(delta, method="wanda", name="w", options=options)), delta)


@pytest.mark.parametrize("shape", [(0,), (0, 7), (1,), (1, 1)])
@pytest.mark.parametrize("method", ["dare", "darex-q", "magnitude", "wanda"])
def test_empty_and_single_element_tensors(method, shape):
    delta = torch.full(shape, 0.5)
    if method == "wanda" and len(shape) != 2:
        pytest.skip("wanda prunes 2-D weights only")
    norms = torch.ones(shape[-1]) if method == "wanda" else None
    options = PruneOptions(drop_rate=0.5, q=0.75, input_norms=norms)
    entry = prune(delta, method=method, name="w", options=options)
    assert entry.shape == shape
    assert entry.indices.numel() <= delta.numel()
    assert entry.indices.numel() == entry.values.numel()


def test_drop_rate_near_one_keeps_few():
    delta = random_delta((101, 103))
    entry = prune(delta, method="dare", name="w", options=PruneOptions(drop_rate=0.9999))
    assert entry.indices.numel() < 20
    assert torch.all(torch.isfinite(entry.values))


def test_zero_deltas_not_stored():
    delta = random_delta((9, 11))
    delta[:4] = 0.0
    entry = prune(delta, method="dare", name="w", options=PruneOptions(drop_rate=0.0))
    assert entry.indices.numel() == 5 * 11
    assert torch.all(entry.indices >= 4 * 11)


def test_half_precision_delta_is_upcast():
    delta = random_delta((9, 11)).to(torch.bfloat16)
    entry = prune(delta, method="dare", name="w", options=PruneOptions(drop_rate=0.5))
    assert entry.values.dtype == torch.float32


@pytest.mark.parametrize("drop_rate", [-0.1, 1.0, 1.5, float("nan")])
def test_drop_rate_out_of_range_raises(drop_rate):
    with pytest.raises(PruningParameterError, match=r"\[0, 1\)"):
        validate_drop_rate(drop_rate)
    with pytest.raises(ValueError, match=repr(drop_rate)):
        prune(random_delta((3, 5)), method="dare", name="w", options=PruneOptions(drop_rate=drop_rate))


@pytest.mark.parametrize("q", [0.05, 1.01, -1.0])
def test_q_out_of_range_raises(q):
    with pytest.raises(PruningParameterError, match=r"\[0.1, 1\]"):
        validate_q(q, 0.9)
    options = PruneOptions(drop_rate=0.9, q=q)
    with pytest.raises(ValueError, match=repr(q)):
        prune(random_delta((3, 5)), method="darex-q", name="w", options=options)


def test_q_bounds_accepted():
    assert validate_q(1.0, 0.9) == 1.0
    assert validate_q(1 - 0.9, 0.9) == pytest.approx(0.1)


def test_darex_q_without_q_raises():
    with pytest.raises(PruningParameterError, match="needs q"):
        prune(random_delta((3, 5)), method="darex-q", name="w", options=PruneOptions(drop_rate=0.5))


def test_unknown_method_lists_known():
    with pytest.raises(PruningParameterError, match="dare, darex-q, magnitude, wanda"):
        prune(random_delta((3, 5)), method="ties", name="w", options=PruneOptions(drop_rate=0.5))

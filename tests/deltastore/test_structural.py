"""Structural pruning: whole rows or columns kept, the DAREx-q rescale, and the compression pipeline."""

from __future__ import annotations

import pytest
import torch

from deltastore.apply import apply, decode, model_params, restore
from deltastore.compress import compress
from deltastore.format import DenseEntry, StructuredEntry, read_delta
from deltastore.methods import PruneOptions, PruningParameterError, keep_count, prune
from deltastore.structural import LINE_RANKINGS

Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


def _delta(shape: tuple[int, int] = (41, 29), *, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 1e-3


@pytest.mark.parametrize("structure", ["rows", "columns"])
@pytest.mark.parametrize("method", ["dare", "darex-q", "magnitude"])
def test_kept_lines_are_whole(method: str, structure: str) -> None:
    delta = _delta()
    options = PruneOptions(drop_rate=0.6, seed=3, q=0.7 if method == "darex-q" else None, structure=structure)

    entry = prune(delta, method=method, name="w", options=options)

    axis = 0 if structure == "rows" else 1
    assert isinstance(entry, StructuredEntry)
    assert entry.axis == axis
    scale = {"dare": 1 / 0.4, "darex-q": 1 / 0.7, "magnitude": 1.0}[method]
    assert torch.allclose(entry.values, delta.index_select(axis, entry.indices) * scale, rtol=1e-6, atol=0)


@pytest.mark.parametrize("structure", ["rows", "columns"])
def test_magnitude_keeps_largest_norm_lines(structure: str) -> None:
    delta = _delta((37, 23))
    axis = 0 if structure == "rows" else 1
    delta.index_fill_(axis, torch.tensor([5, 11, 19]), 0.5)

    entry = prune(delta, method="magnitude", name="w", options=PruneOptions(drop_rate=0.9, structure=structure))

    count = keep_count(delta.shape[axis], 0.9)
    assert entry.indices.numel() == count
    norms = delta.norm(dim=1 - axis)
    assert set(entry.indices.tolist()) == set(torch.topk(norms, count).indices.tolist())


def test_wanda_rows_weigh_input_norms() -> None:
    delta = torch.ones(5, 4) * 1e-3
    delta[0, 0] = 2e-3
    delta[3, 3] = 2e-3
    norms = torch.tensor([1.0, 1.0, 1.0, 100.0])

    entry = prune(delta, method="wanda", name="w", options=PruneOptions(drop_rate=0.8, input_norms=norms, structure="rows"))

    assert entry.indices.tolist() == [3]


def test_random_lines_kept_at_keep_rate() -> None:
    delta = _delta((2001, 3))

    entry = prune(delta, method="dare", name="w", options=PruneOptions(drop_rate=0.75, seed=1, structure="rows"))

    assert 0.2 < entry.indices.numel() / 2001 < 0.3


def test_random_lines_same_for_same_seed_and_name() -> None:
    delta = _delta()
    options = PruneOptions(drop_rate=0.5, seed=9, structure="columns")

    first = prune(delta, method="dare", name="w", options=options)
    again = prune(delta, method="dare", name="w", options=options)
    other = prune(delta, method="dare", name="v", options=options)

    assert torch.equal(first.indices, again.indices)
    assert not torch.equal(first.indices, other.indices)


def test_zero_lines_never_stored() -> None:
    delta = _delta((9, 7))
    delta[2] = 0.0

    entry = prune(delta, method="dare", name="w", options=PruneOptions(drop_rate=0.0, structure="rows"))

    assert entry.indices.tolist() == [0, 1, 3, 4, 5, 6, 7, 8]


def test_drop_rate_zero_keeps_every_line_unscaled() -> None:
    delta = _delta()

    entry = prune(delta, method="dare", name="w", options=PruneOptions(drop_rate=0.0, structure="columns"))

    assert torch.equal(entry.values, delta)


def test_structure_rejects_1d_and_unknown() -> None:
    with pytest.raises(PruningParameterError, match="2-D"):
        prune(torch.ones(5), method="dare", name="norm", options=PruneOptions(drop_rate=0.5, structure="rows"))
    with pytest.raises(PruningParameterError, match="invalid structure 'blocks'"):
        prune(_delta(), method="dare", name="w", options=PruneOptions(drop_rate=0.5, structure="blocks"))


def test_every_method_has_line_ranking() -> None:
    from deltastore.methods import METHODS

    assert set(LINE_RANKINGS) == set(METHODS)


@pytest.mark.parametrize("structure", ["rows", "columns"])
def test_compress_writes_structured_entries(tmp_path, tiny_base, tiny_finetunes, structure: str) -> None:
    metadata = compress(
        base=tiny_base, finetuned=tiny_finetunes["alpha"], task="alpha", store=tmp_path, method="darex-q",
        drop_rate=0.5, q=0.8, value_dtype="float32", structure=structure,
    )

    delta = read_delta(tmp_path / "alpha.delta.safetensors")
    assert metadata.params["structure"] == structure
    assert metadata.tensors[Q_PROJ].kind == structure
    assert isinstance(delta.entries["model.norm.weight"], DenseEntry)
    expected = prune(
        _float32_delta(tiny_base, tiny_finetunes["alpha"], Q_PROJ),
        method="darex-q", name=Q_PROJ, options=PruneOptions(drop_rate=0.5, q=0.8, structure=structure),
    )
    assert torch.equal(delta.entries[Q_PROJ].indices, expected.indices)
    assert torch.equal(delta.entries[Q_PROJ].values, expected.values)


def _float32_delta(base, finetuned, name: str) -> torch.Tensor:
    from deltastore.checkpoint import Checkpoint

    return Checkpoint.open(finetuned).get(name).float() - Checkpoint.open(base).get(name).float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_structured_delta_restores_model_bit_exact(tmp_path, tiny_base, tiny_finetunes, dtype) -> None:
    from transformers import AutoModelForCausalLM

    compress(
        base=tiny_base, finetuned=tiny_finetunes["alpha"], task="alpha", store=tmp_path, method="magnitude",
        drop_rate=0.7, structure="rows",
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=dtype)
    params = model_params(model)
    base = {name: tensor.detach().clone() for name, tensor in params.items()}
    decoded = decode(read_delta(tmp_path / "alpha.delta.safetensors"))

    for _ in range(3):
        applied = apply(params, decoded)
        assert not torch.equal(params[Q_PROJ], base[Q_PROJ])
        restore(params, applied)

    for name, tensor in params.items():
        assert torch.equal(tensor.view(torch.uint8), base[name].view(torch.uint8)), name


def test_structured_output_change_q_search(tmp_path, tiny_base, tiny_finetunes) -> None:
    calibration = tmp_path / "calibration.txt"
    calibration.write_text("The quick brown fox jumps over the lazy dog.\nSparse deltas are applied in place.\n")

    metadata = compress(
        base=tiny_base, finetuned=tiny_finetunes["alpha"], task="alpha", store=tmp_path / "store", method="darex-q",
        drop_rate=0.5, q_select="output-change", calibration=calibration, structure="rows", window_tokens=16,
        max_windows=2,
    )

    q = metadata.params["q"]
    assert 0.5 <= q <= 1.0
    entry = read_delta(tmp_path / "store" / "alpha.delta.safetensors").entries[Q_PROJ]
    expected = prune(
        _float32_delta(tiny_base, tiny_finetunes["alpha"], Q_PROJ),
        method="darex-q", name=Q_PROJ, options=PruneOptions(drop_rate=0.5, q=q, structure="rows"),
    )
    assert torch.equal(entry.indices, expected.indices)
    assert torch.allclose(entry.values, expected.values, rtol=2**-10, atol=0)

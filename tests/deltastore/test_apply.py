"""apply/restore on live tensors: exact restore in every dtype, and the drifting subtract baseline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from deltastore.apply import apply, check_compatible, decode, model_params, pack_parameters, prepare_merged, restore
from deltastore.format import DeltaFile, DeltaFormatError, DenseEntry, SparseEntry, read_delta, write_delta

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _delta(shapes: dict[str, tuple[int, ...]], *, keep: float = 0.1, scale: float = 1e-2, seed: int = 0) -> DeltaFile:
    generator = torch.Generator().manual_seed(seed)
    entries = {}
    for name, shape in shapes.items():
        numel = torch.Size(shape).numel()
        nnz = max(1, int(numel * keep))
        indices = torch.randperm(numel, generator=generator)[:nnz].sort().values
        entries[name] = SparseEntry(shape=shape, indices=indices, values=torch.randn(nnz, generator=generator) * scale)
    entries["norm"] = DenseEntry(shape=(13,), values=torch.randn(13, generator=generator) * scale)
    return _in_memory(entries)


def _in_memory(entries: dict) -> DeltaFile:
    from deltastore.format import DeltaMetadata, TensorInfo

    tensors = {
        name: TensorInfo("dense" if isinstance(e, DenseEntry) else "sparse", e.shape, e.values.numel(), "float32")
        for name, e in entries.items()
    }
    metadata = DeltaMetadata(1, "demo", "sha256:0", "dare", {}, tensors, "", "")
    return DeltaFile(path=Path("demo.delta.safetensors"), metadata=metadata, entries=entries)


def _params(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {
        "a": torch.randn(37, 53, generator=generator).to(dtype),
        "b": torch.randn(211, generator=generator).to(dtype),
        "norm": torch.randn(13, generator=generator).to(dtype),
    }


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_apply_restore_bit_exact_over_1000_cycles(dtype: torch.dtype) -> None:
    params = _params(dtype)
    base = {name: tensor.clone() for name, tensor in params.items()}
    decoded = decode(_delta({"a": (37, 53), "b": (211,)}))

    for _ in range(1000):
        restore(params, apply(params, decoded))

    for name in params:
        assert torch.equal(params[name].view(torch.uint8), base[name].view(torch.uint8)), name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_apply_writes_base_plus_delta_rounded_once(dtype: torch.dtype) -> None:
    params = _params(dtype)
    base = {name: tensor.clone() for name, tensor in params.items()}
    delta = _delta({"a": (37, 53), "b": (211,)})

    apply(params, decode(delta))

    for name, entry in delta.entries.items():
        expected = base[name].float().clone()
        if isinstance(entry, DenseEntry):
            expected += entry.values
        else:
            expected.view(-1)[entry.indices] += entry.values
        assert torch.equal(params[name], expected.to(dtype)), name


def test_apply_changes_only_kept_positions() -> None:
    params = _params(torch.float32)
    base = params["a"].clone()
    delta = _delta({"a": (37, 53)})

    apply(params, decode(delta))

    changed = (params["a"] != base).view(-1).nonzero().view(-1)
    assert torch.equal(changed, delta.entries["a"].indices)


def test_subtract_mode_drifts_in_bfloat16() -> None:
    params = _params(torch.bfloat16)
    base = params["a"].clone()
    decoded = decode(_delta({"a": (37, 53)}, keep=0.5, scale=0.3))

    for _ in range(100):
        restore(params, apply(params, decoded, mode="subtract"))

    drifted = int((params["a"] != base).sum())
    assert drifted > 0


def test_subtract_mode_round_trips_float32_closely() -> None:
    params = _params(torch.float32)
    base = params["a"].clone()
    decoded = decode(_delta({"a": (37, 53)}))

    restore(params, apply(params, decoded, mode="subtract"))

    assert torch.allclose(params["a"], base, atol=1e-6)


def test_restore_twice_is_rejected() -> None:
    params = _params(torch.float32)
    applied = apply(params, decode(_delta({"a": (37, 53)})))
    restore(params, applied)
    with pytest.raises(RuntimeError, match="already restored"):
        restore(params, applied)


def test_invalid_mode_is_rejected() -> None:
    with pytest.raises(ValueError, match="invalid apply mode 'merge'"):
        apply(_params(torch.float32), decode(_delta({"a": (37, 53)})), mode="merge")


def test_check_compatible_names_missing_tensor() -> None:
    delta = _delta({"a": (37, 53), "missing.weight": (4, 4)})
    with pytest.raises(DeltaFormatError, match="missing.weight"):
        check_compatible(delta.metadata, _params(torch.float32))


def test_check_compatible_names_both_shapes() -> None:
    delta = _delta({"a": (53, 37)})
    with pytest.raises(DeltaFormatError, match=r"\(53, 37\).*\(37, 53\)"):
        check_compatible(delta.metadata, _params(torch.float32))


def test_model_params_lists_tied_embedding_once(tiny_base: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    params = model_params(model)

    assert "model.embed_tokens.weight" in params
    assert "lm_head.weight" not in params
    assert all(params[name] is tensor for name, tensor in model.state_dict(keep_vars=True).items() if name in params)


def test_delta_file_applies_to_real_model_and_restores(tiny_base: Path, tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.bfloat16)
    params = model_params(model)
    before = {name: tensor.detach().clone() for name, tensor in params.items()}
    shapes = {name: tuple(t.shape) for name, t in params.items() if name.endswith("proj.weight")}
    entries = {}
    for offset, (name, shape) in enumerate(sorted(shapes.items())):
        numel = torch.Size(shape).numel()
        indices = torch.arange(offset % 7, numel, 7)
        entries[name] = SparseEntry(shape=shape, indices=indices, values=torch.full((indices.numel(),), 0.125))
    path = tmp_path / "demo.delta.safetensors"
    write_delta(path, task="demo", base_fingerprint="sha256:0", method="dare", params={}, entries=entries)
    delta = read_delta(path)
    check_compatible(delta.metadata, params)
    ids = torch.tensor([[5, 17, 42, 99]])

    base_logits = model(ids).logits
    applied = apply(params, decode(delta))
    delta_logits = model(ids).logits
    restore(params, applied)
    restored_logits = model(ids).logits

    assert not torch.equal(base_logits, delta_logits)
    assert torch.equal(base_logits, restored_logits)
    for name, tensor in params.items():
        assert torch.equal(tensor.detach().view(torch.uint8), before[name].view(torch.uint8)), name


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_apply_restore_bit_exact_on_cuda(dtype: torch.dtype) -> None:
    params = {name: tensor.cuda() for name, tensor in _params(dtype).items()}
    base = {name: tensor.clone() for name, tensor in params.items()}
    decoded = decode(_delta({"a": (37, 53), "b": (211,)}), device="cuda")

    for _ in range(1000):
        restore(params, apply(params, decoded))

    for name in params:
        assert torch.equal(params[name], base[name]), name


def _structured_delta(*, seed: int = 0) -> DeltaFile:
    from deltastore.format import DeltaMetadata, StructuredEntry, TensorInfo

    generator = torch.Generator().manual_seed(seed)
    rows = torch.tensor([0, 3, 17, 36])
    columns = torch.tensor([1, 2, 30, 52])
    entries = {
        "a": StructuredEntry(shape=(37, 53), axis=0, indices=rows, values=torch.randn(4, 53, generator=generator) * 1e-2),
        "c": StructuredEntry(shape=(29, 53), axis=1, indices=columns, values=torch.randn(29, 4, generator=generator) * 1e-2),
    }
    tensors = {
        name: TensorInfo(
            entry.kind, entry.shape, entry.values.numel(), "float32"
        )
        for name, entry in entries.items()
    }
    metadata = DeltaMetadata(1, "lines", "sha256:0", "dare", {}, tensors, "", "")
    return DeltaFile(path=Path("lines.delta.safetensors"), metadata=metadata, entries=entries)


def _structured_params(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    return {"a": torch.randn(37, 53, generator=generator).to(dtype), "c": torch.randn(29, 53, generator=generator).to(dtype)}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_structured_apply_restore_bit_exact(dtype: torch.dtype) -> None:
    params = _structured_params(dtype)
    base = {name: tensor.clone() for name, tensor in params.items()}
    decoded = decode(_structured_delta())

    for _ in range(200):
        restore(params, apply(params, decoded))

    for name in params:
        assert torch.equal(params[name].view(torch.uint8), base[name].view(torch.uint8)), name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_structured_apply_writes_whole_lines(dtype: torch.dtype) -> None:
    params = _structured_params(dtype)
    base = {name: tensor.clone() for name, tensor in params.items()}
    delta = _structured_delta()

    apply(params, decode(delta))

    rows = delta.entries["a"]
    expected_a = base["a"].float().clone()
    expected_a[rows.indices] += rows.values
    assert torch.equal(params["a"], expected_a.to(dtype))
    columns = delta.entries["c"]
    expected_c = base["c"].float().clone()
    expected_c[:, columns.indices] += columns.values
    assert torch.equal(params["c"], expected_c.to(dtype))
    untouched = [row for row in range(37) if row not in rows.indices.tolist()]
    assert torch.equal(params["a"][untouched], base["a"][untouched])


def test_structured_subtract_mode_round_trips_in_float32() -> None:
    params = _structured_params(torch.float32)
    base = {name: tensor.clone() for name, tensor in params.items()}

    restore(params, apply(params, decode(_structured_delta()), mode="subtract"))

    for name in params:
        assert torch.allclose(params[name], base[name], atol=1e-6), name


def test_structured_lines_wrong_width_rejected() -> None:
    params = {"a": torch.zeros(37, 50), "c": torch.zeros(29, 53)}

    with pytest.raises(DeltaFormatError, match="keeps lines of shape"):
        apply(params, decode(_structured_delta()))


def _packable_params(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(4)
    return {
        "a": torch.randn(37, 53, generator=generator).to(dtype),
        "b": torch.randn(211, generator=generator).to(dtype),
        "c": torch.randn(19, 7, generator=generator).to(dtype),
        "norm": torch.randn(13, generator=generator).to(dtype),
    }


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_packed_apply_matches_unpacked(dtype: torch.dtype) -> None:
    packed, plain = _packable_params(dtype), _packable_params(dtype)
    assert pack_parameters(packed) == 1
    decoded = decode(_delta({"a": (37, 53), "b": (211,), "c": (19, 7)}))

    applied = apply(packed, decoded)
    apply(plain, decode(_delta({"a": (37, 53), "b": (211,), "c": (19, 7)})))

    assert len(applied.merged) == 1
    assert applied.merged[0][1].members == frozenset({0, 1, 2})  # a, b, c; the dense norm goes alone
    for name in plain:
        assert torch.equal(packed[name].view(torch.uint8), plain[name].view(torch.uint8)), name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_packed_apply_restore_bit_exact_over_1000_cycles(dtype: torch.dtype) -> None:
    params = _packable_params(dtype)
    pack_parameters(params)
    base = {name: tensor.clone() for name, tensor in params.items()}
    decoded = decode(_delta({"a": (37, 53), "b": (211,), "c": (19, 7)}))

    for _ in range(1000):
        restore(params, apply(params, decoded))

    for name in params:
        assert torch.equal(params[name].view(torch.uint8), base[name].view(torch.uint8)), name


def test_pack_parameters_keeps_model_output(tiny_base: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    ids = torch.tensor([[5, 9, 13, 2, 7]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
        pack_parameters(model_params(model))
        after = model(input_ids=ids).logits
    params = model_params(model)
    storages = {tensor.untyped_storage().data_ptr() for tensor in params.values()}
    assert len(storages) == 1
    assert torch.equal(before, after)


def test_packed_subtract_mode_round_trips_float32() -> None:
    params = _packable_params(torch.float32)
    pack_parameters(params)
    base = {name: tensor.clone() for name, tensor in params.items()}

    restore(params, apply(params, decode(_delta({"a": (37, 53), "c": (19, 7)})), mode="subtract"))

    for name in params:
        assert torch.allclose(params[name], base[name], atol=1e-6), name


def test_prepare_merged_counts_positions_in_nbytes() -> None:
    params = _packable_params(torch.float32)
    pack_parameters(params)
    decoded = decode(_delta({"a": (37, 53), "b": (211,)}))
    before = decoded.nbytes

    prepare_merged(params, decoded)

    nnz = sum(t.indices.numel() for t in decoded.tensors if t.indices is not None)
    assert decoded.nbytes == before + nnz * 12  # int64 position and float32 value per kept value

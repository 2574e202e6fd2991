"""LoRA adapter input: PEFT's merge formula, the p = 0 round trip, and rejected adapters."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from deltastore.apply import apply, decode, model_params
from deltastore.compress import compress
from deltastore.format import read_delta
from deltastore.lora import LoraAdapter, LoraError, lora_delta

# (module, out_features, in_features) of the tiny Llama in tests/tinymodel.py.
TARGETS = [
    ("model.layers.0.self_attn.q_proj", 48, 48),
    ("model.layers.0.self_attn.v_proj", 24, 48),
    ("model.layers.1.mlp.down_proj", 48, 88),
]


def write_adapter(
    folder: Path,
    *,
    rank: int = 5,
    alpha: float = 11.0,
    targets=TARGETS,
    config_extra: dict | None = None,
    extra_tensors: dict | None = None,
    seed: int = 0,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Write a PEFT-style adapter folder and return {module: (A, B)}."""
    generator = torch.Generator().manual_seed(seed)
    tensors, factors = {}, {}
    for module, out_features, in_features in targets:
        a = torch.randn(rank, in_features, generator=generator) * 0.05
        b = torch.randn(out_features, rank, generator=generator) * 0.05
        tensors[f"base_model.model.{module}.lora_A.weight"] = a
        tensors[f"base_model.model.{module}.lora_B.weight"] = b
        factors[module] = (a, b)
    tensors.update(extra_tensors or {})
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": sorted({module.rsplit(".", 1)[1] for module, _, _ in targets}),
        "use_rslora": False,
        "fan_in_fan_out": False,
        **(config_extra or {}),
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, folder / "adapter_model.safetensors")
    return factors


def test_product_matches_merge_formula(tmp_path) -> None:
    factors = write_adapter(tmp_path / "adapter", rank=5, alpha=11.0)

    adapter = LoraAdapter.open(tmp_path / "adapter")

    for module, (a, b) in factors.items():
        expected = (11.0 / 5) * (b.double() @ a.double())
        assert torch.allclose(adapter.modules[f"{module}.weight"].delta().double(), expected, rtol=1e-5, atol=1e-8), module


def test_rslora_scales_by_sqrt_rank(tmp_path) -> None:
    factors = write_adapter(tmp_path / "adapter", rank=4, alpha=6.0, config_extra={"use_rslora": True})

    adapter = LoraAdapter.open(tmp_path / "adapter")

    module = TARGETS[0][0]
    a, b = factors[module]
    assert adapter.modules[f"{module}.weight"].scaling == pytest.approx(6.0 / math.sqrt(4))
    assert torch.allclose(adapter.modules[f"{module}.weight"].delta(), 3.0 * (b @ a), rtol=1e-5, atol=1e-8)


def test_alpha_pattern_overrides_one_module(tmp_path) -> None:
    write_adapter(tmp_path / "adapter", rank=5, alpha=10.0, config_extra={"alpha_pattern": {"v_proj": 20.0}})

    adapter = LoraAdapter.open(tmp_path / "adapter")

    assert adapter.modules["model.layers.0.self_attn.v_proj.weight"].scaling == pytest.approx(4.0)
    assert adapter.modules["model.layers.0.self_attn.q_proj.weight"].scaling == pytest.approx(2.0)


def test_fan_in_fan_out_transposes() -> None:
    a, b = torch.randn(3, 7), torch.randn(5, 3)
    assert torch.allclose(lora_delta(a, b, scaling=0.5, fan_in_fan_out=True), 0.5 * (b @ a).T)


def _merged_model(base: Path, factors, scaling: float):
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    params = model_params(model)
    with torch.no_grad():
        for module, (a, b) in factors.items():
            params[f"{module}.weight"] += scaling * (b @ a)
    return model


def test_p0_delta_reproduces_merged_logits(tmp_path, tiny_base) -> None:
    factors = write_adapter(tmp_path / "adapter", rank=5, alpha=11.0)
    metadata = compress(base=tiny_base, lora=tmp_path / "adapter", task="lora", store=tmp_path / "store",
                        method="dare", drop_rate=0.0, value_dtype="float32")
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    tokens = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])
    base_logits = model(input_ids=tokens).logits

    apply(model_params(model), decode(read_delta(tmp_path / "store" / "lora.delta.safetensors")))

    merged_logits = _merged_model(tiny_base, factors, 11.0 / 5)(input_ids=tokens).logits
    pruned_logits = model(input_ids=tokens).logits
    assert sorted(metadata.tensors) == sorted(f"{module}.weight" for module, _, _ in TARGETS)
    assert metadata.extra["source"] == "lora"
    assert not torch.allclose(base_logits, merged_logits, atol=1e-3)
    assert torch.allclose(pruned_logits, merged_logits, atol=1e-5)


def test_pruned_product_not_factors(tmp_path, tiny_base) -> None:
    write_adapter(tmp_path / "adapter")
    compress(base=tiny_base, lora=tmp_path / "adapter", task="lora", store=tmp_path / "store",
             method="magnitude", drop_rate=0.9, value_dtype="float32")

    entry = read_delta(tmp_path / "store" / "lora.delta.safetensors").entries["model.layers.0.self_attn.q_proj.weight"]
    delta = LoraAdapter.open(tmp_path / "adapter").modules["model.layers.0.self_attn.q_proj.weight"].delta()

    assert entry.indices.numel() == round(48 * 48 * 0.1)
    assert torch.equal(entry.values, delta.reshape(-1)[entry.indices])


def test_output_change_q_search_with_lora(tmp_path, tiny_base) -> None:
    write_adapter(tmp_path / "adapter")
    calibration = tmp_path / "calibration.txt"
    calibration.write_text("The quick brown fox jumps over the lazy dog.\n")

    metadata = compress(base=tiny_base, lora=tmp_path / "adapter", task="lora", store=tmp_path / "store",
                        method="darex-q", drop_rate=0.9, q_select="output-change", calibration=calibration,
                        window_tokens=16, max_windows=1)

    assert 0.1 <= metadata.params["q"] <= 1.0
    assert metadata.params["q_search"]["trace"]


def test_unknown_module_rejected_by_name(tmp_path, tiny_base) -> None:
    write_adapter(tmp_path / "adapter", targets=[*TARGETS, ("model.layers.0.self_attn.gate_x", 48, 48)])

    with pytest.raises(LoraError, match=r"does not have: \['model.layers.0.self_attn.gate_x'\]"):
        compress(base=tiny_base, lora=tmp_path / "adapter", task="lora", store=tmp_path / "store",
                 method="dare", drop_rate=0.5)


def test_wrong_shape_rejected_by_name(tmp_path, tiny_base) -> None:
    write_adapter(tmp_path / "adapter", targets=[("model.layers.0.self_attn.k_proj", 48, 48)])

    with pytest.raises(LoraError, match=r"'model.layers.0.self_attn.k_proj' forms a delta of shape \(48, 48\).*\(24, 48\)"):
        compress(base=tiny_base, lora=tmp_path / "adapter", task="lora", store=tmp_path / "store",
                 method="dare", drop_rate=0.5)


def test_unsupported_keys_rejected(tmp_path) -> None:
    extra = {"base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(48)}
    write_adapter(tmp_path / "adapter", extra_tensors=extra)

    with pytest.raises(LoraError, match="lora_magnitude_vector"):
        LoraAdapter.open(tmp_path / "adapter")


def test_dora_config_rejected(tmp_path) -> None:
    write_adapter(tmp_path / "adapter", config_extra={"use_dora": True})

    with pytest.raises(LoraError, match="DoRA"):
        LoraAdapter.open(tmp_path / "adapter")


def test_rank_mismatch_rejected(tmp_path) -> None:
    write_adapter(tmp_path / "adapter", rank=5, config_extra={"r": 8})

    with pytest.raises(LoraError, match="rank 5 in its weights but 8"):
        LoraAdapter.open(tmp_path / "adapter")


def test_missing_adapter_files_rejected(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoraError, match="no adapter_config.json"):
        LoraAdapter.open(tmp_path / "empty")
    (tmp_path / "empty" / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8}))
    with pytest.raises(LoraError, match="no adapter_model.safetensors"):
        LoraAdapter.open(tmp_path / "empty")


def test_finetuned_and_lora_exclusive(tmp_path, tiny_base, tiny_finetunes) -> None:
    write_adapter(tmp_path / "adapter")
    with pytest.raises(ValueError, match="exactly one"):
        compress(base=tiny_base, finetuned=tiny_finetunes["alpha"], lora=tmp_path / "adapter", task="lora",
                 store=tmp_path / "store", method="dare", drop_rate=0.5)


def test_cli_compress_lora(tmp_path, tiny_base, capsys) -> None:
    import argparse

    from deltastore import cli

    write_adapter(tmp_path / "adapter")
    parser = argparse.ArgumentParser(prog="deltamux")
    cli.add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["compress", "--base", str(tiny_base), "--lora", str(tmp_path / "adapter"), "--task", "lora",
                              "--store", str(tmp_path / "store"), "--method", "dare", "--drop-rate", "0.5"])

    assert args.func(args) == 0
    assert (tmp_path / "store" / "lora.delta.safetensors").is_file()

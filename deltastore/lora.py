"""A PEFT LoRA adapter folder read as a delta of its base: `scaling * B @ A` per target module.

PEFT (huggingface/peft, `src/peft/tuners/lora/layer.py`) merges a LoRA module into its base
weight as `W + scaling * B @ A`. `A` has shape (r, in_features), `B` has shape (out_features, r),
and `scaling = lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA (`use_rslora`). With
`fan_in_fan_out` (GPT-2 style Conv1D weights stored as (in, out)) the product is transposed.
Per-module overrides come from `rank_pattern` and `alpha_pattern`, matched as PEFT's
`get_pattern_key` (`src/peft/utils/other.py`) does. This module forms that product
in float32 for every target module, so any pruning method can prune it as a delta. PEFT's own DARE
merge prunes `A` and `B` separately with independent masks, which is not the same thing.

An adapter folder holds `adapter_config.json` and `adapter_model.safetensors` whose keys read
`base_model.model.<module>.lora_A.weight` and `...lora_B.weight`. Only plain linear LoRA is
accepted: embedding LoRA, DoRA magnitudes, LoRA biases and `modules_to_save` copies are rejected
with the keys named.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from deltastore.checkpoint import Checkpoint

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<role>[AB])\.weight")


class LoraError(ValueError):
    """An adapter folder is missing, malformed, or does not fit the base checkpoint."""


def lora_scaling(*, alpha: float, rank: int, use_rslora: bool = False) -> float:
    """Return PEFT's merge scale: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    if rank <= 0:
        raise LoraError(f"LoRA rank must be positive, got {rank!r}")
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def lora_delta(a: torch.Tensor, b: torch.Tensor, *, scaling: float, fan_in_fan_out: bool = False) -> torch.Tensor:
    """Return `scaling * B @ A` in float32, transposed for fan-in-fan-out weights."""
    # float32: a bf16 product of the low-rank factors would round the small delta entries.
    product = b.to(torch.float32) @ a.to(torch.float32)  # (out, in)
    product *= scaling
    return product.T.contiguous() if fan_in_fan_out else product


def _pattern_value(patterns: dict, module: str, default):
    """Return the first override in `patterns` whose key, a regex, matches the end of `module`, else `default`."""
    for key, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?({key})", module):
            return value
    return default


@dataclass(frozen=True)
class LoraModule:
    """One target module's factors and merge scale."""

    module: str
    weight_name: str
    a: torch.Tensor  # (r, in_features)
    b: torch.Tensor  # (out_features, r)
    scaling: float
    fan_in_fan_out: bool

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    @property
    def delta_shape(self) -> tuple[int, int]:
        out_features, in_features = int(self.b.shape[0]), int(self.a.shape[1])
        return (in_features, out_features) if self.fan_in_fan_out else (out_features, in_features)

    def delta(self) -> torch.Tensor:
        return lora_delta(self.a, self.b, scaling=self.scaling, fan_in_fan_out=self.fan_in_fan_out)


@dataclass(frozen=True)
class LoraAdapter:
    """A PEFT LoRA adapter folder: its config and its modules keyed by the base weight name."""

    folder: Path
    config: dict
    modules: dict[str, LoraModule]

    @classmethod
    def open(cls, folder: str | Path) -> LoraAdapter:
        """Read and check an adapter folder; raise LoraError naming any unsupported key or field."""
        folder = Path(folder)
        config = _read_config(folder)
        factors = _read_factors(folder)

        use_rslora = bool(config.get("use_rslora", False))
        fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
        rank_pattern = config.get("rank_pattern") or {}
        alpha_pattern = config.get("alpha_pattern") or {}
        default_alpha = config.get("lora_alpha", config.get("r"))

        modules: dict[str, LoraModule] = {}
        for module, pair in sorted(factors.items()):
            if set(pair) != {"A", "B"}:
                missing = "lora_B" if "A" in pair else "lora_A"
                raise LoraError(f"adapter {str(folder)!r}: module {module!r} has no {missing} weight")
            a, b = pair["A"], pair["B"]
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
                raise LoraError(
                    f"adapter {str(folder)!r}: module {module!r} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
                    "expected (r, in_features) and (out_features, r)"
                )
            rank = int(a.shape[0])
            expected_rank = int(_pattern_value(rank_pattern, module, config.get("r", rank)))
            if expected_rank != rank:
                raise LoraError(
                    f"adapter {str(folder)!r}: module {module!r} has rank {rank} in its weights but {expected_rank} in "
                    f"{ADAPTER_CONFIG}; the files do not belong together"
                )
            alpha = float(_pattern_value(alpha_pattern, module, default_alpha))
            modules[f"{module}.weight"] = LoraModule(
                module=module,
                weight_name=f"{module}.weight",
                a=a,
                b=b,
                scaling=lora_scaling(alpha=alpha, rank=rank, use_rslora=use_rslora),
                fan_in_fan_out=fan_in_fan_out,
            )
        if not modules:
            raise LoraError(f"adapter {str(folder)!r} holds no lora_A / lora_B weights")
        return cls(folder=folder, config=config, modules=modules)


def _read_config(folder: Path) -> dict:
    path = folder / ADAPTER_CONFIG
    if not folder.is_dir():
        raise LoraError(f"adapter folder {str(folder)!r} does not exist; pass the folder with {ADAPTER_CONFIG}")
    if not path.is_file():
        raise LoraError(f"adapter folder {str(folder)!r} has no {ADAPTER_CONFIG}; is it a PEFT LoRA adapter?")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise LoraError(f"cannot read {str(path)!r}: {e}") from e
    if not isinstance(config, dict):
        raise LoraError(f"{str(path)!r} is not a JSON object")
    peft_type = config.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise LoraError(f"adapter {str(folder)!r} is a {peft_type!r} adapter; only LORA adapters are supported")
    if config.get("use_dora"):
        raise LoraError(f"adapter {str(folder)!r} uses DoRA (use_dora), whose merge is not B @ A; merge it with PEFT first")
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if value is not None and (not isinstance(value, (int, float)) or value <= 0):
            raise LoraError(f"{str(path)!r}: {key} must be a positive number, got {value!r}")
    return config


def _read_factors(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    path = folder / ADAPTER_WEIGHTS
    if not path.is_file():
        found = sorted(p.name for p in folder.glob("adapter_model.*"))
        hint = f" (found {found!r}; convert .bin adapters to safetensors)" if found else ""
        raise LoraError(f"adapter folder {str(folder)!r} has no {ADAPTER_WEIGHTS}{hint}")
    factors: dict[str, dict[str, torch.Tensor]] = {}
    unsupported = []
    try:
        with safe_open(path, framework="pt") as handle:
            for key in handle.keys():
                match = _KEY.fullmatch(key)
                if match is None:
                    unsupported.append(key)
                    continue
                tensor = handle.get_tensor(key)
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    raise LoraError(f"adapter {str(folder)!r}: {key!r} contains NaN or infinite values")
                factors.setdefault(match["module"], {})[match["role"]] = tensor
    except LoraError:
        raise
    except Exception as e:  # safetensors raises its own error type for a damaged file
        raise LoraError(f"cannot read {str(path)!r}: {e}") from e
    if unsupported:
        raise LoraError(
            f"adapter {str(folder)!r} has keys that are not plain linear LoRA factors "
            f"(embedding LoRA, DoRA, LoRA bias or modules_to_save): {sorted(unsupported)[:5]!r}; "
            "deltamux reads only 'base_model.model.<module>.lora_A.weight' and '.lora_B.weight'"
        )
    return factors


class LoraCheckpoint:
    """A base checkpoint plus a LoRA adapter, read where the pipeline expects a fine-tuned checkpoint.

    Names, shapes and dtypes are the base's; `delta(name)` returns the adapter's float32 delta, or
    None for a tensor the adapter does not change.
    """

    def __init__(self, base: Checkpoint, adapter: LoraAdapter) -> None:
        self.base = base
        self.adapter = adapter
        self.folder = adapter.folder
        self.config = base.config
        self.names = base.names
        self.tied_embeddings = base.tied_embeddings

    def shape(self, name: str) -> tuple[int, ...]:
        return self.base.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.base.dtype(name)

    def delta(self, name: str) -> torch.Tensor | None:
        module = self.adapter.modules.get(name)
        return None if module is None else module.delta()

    def get(self, name: str) -> torch.Tensor:
        """Return the merged tensor in float32 (base plus the adapter's delta)."""
        tensor = self.base.get(name)
        delta = self.delta(name)
        return tensor if delta is None else tensor.to(torch.float32) + delta

    def load_model(self, *, device: str = "cpu"):
        """Load the base model in float32 with its tokenizer and merge the adapter into it."""
        from deltastore.apply import model_params
        from deltastore.scoring import load_causal_lm

        model, tokenizer = load_causal_lm(self.base.folder, device=device)
        params = model_params(model)
        with torch.no_grad():
            for name, module in self.adapter.modules.items():
                params[name].add_(module.delta().to(params[name].device))
        return model, tokenizer


def open_lora_pair(base: str | Path, lora: str | Path) -> tuple[Checkpoint, LoraCheckpoint]:
    """Open a base checkpoint and an adapter; raise unless every target module is a base weight of its shape."""
    base_checkpoint = Checkpoint.open(base)
    adapter = LoraAdapter.open(lora)
    names = set(base_checkpoint.names)
    unknown = sorted(name for name in adapter.modules if name not in names)
    if unknown:
        raise LoraError(
            f"adapter {str(lora)!r} targets modules the base {str(base)!r} does not have: "
            f"{[name[: -len('.weight')] for name in unknown[:5]]!r}; was it trained on another base?"
        )
    for name, module in adapter.modules.items():
        shape = base_checkpoint.shape(name)
        if shape != module.delta_shape:
            raise LoraError(
                f"adapter {str(lora)!r}: module {module.module!r} forms a delta of shape {module.delta_shape} "
                f"(lora_A {tuple(module.a.shape)}, lora_B {tuple(module.b.shape)}) but the base weight has shape {shape}"
            )
    logger.info("LoRA adapter %s: %d target modules, ranks %s", lora, len(adapter.modules),
                sorted({module.rank for module in adapter.modules.values()}))
    return base_checkpoint, LoraCheckpoint(base_checkpoint, adapter)

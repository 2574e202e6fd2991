"""Hugging Face checkpoint folders, read one tensor at a time, and the base fingerprint.

A folder holds either one `model.safetensors` or several shards listed in
`model.safetensors.index.json`. Tensors are opened lazily with `safe_open`, so callers can walk
two checkpoints side by side while holding only a few tensors in memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

logger = logging.getLogger(__name__)

FINGERPRINT_FILE = "deltamux-fingerprint.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_HASH_CHUNK = 1 << 24  # bytes hashed per update, so one huge tensor never needs a second copy


class CheckpointError(ValueError):
    """A checkpoint folder is missing, unreadable or not in the safetensors layout."""


@dataclass
class Checkpoint:
    """One HF checkpoint folder: its config and a lazy, name-addressed view of its tensors."""

    folder: Path
    config: dict
    files: dict[str, Path]  # tensor name -> the shard that contains it
    _shapes: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False)
    _dtypes: dict[str, torch.dtype] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, folder: str | Path) -> Checkpoint:
        """Index the tensors of `folder` without loading any of them."""
        folder = Path(folder)
        if not folder.exists():
            raise CheckpointError(f"checkpoint folder {str(folder)!r} does not exist; pass the folder that holds config.json and *.safetensors")
        if not folder.is_dir():
            raise CheckpointError(f"checkpoint path {str(folder)!r} is a file, not a folder; pass the folder that holds it")
        config = _read_config(folder)
        files = _index_tensors(folder)
        checkpoint = cls(folder=folder, config=config, files=files)
        for shard in sorted(set(files.values())):
            with safe_open(shard, framework="pt") as handle:
                for name in handle.keys():
                    if files.get(name) != shard:
                        continue
                    view = handle.get_slice(name)
                    checkpoint._shapes[name] = tuple(view.get_shape())
                    checkpoint._dtypes[name] = _DTYPES[view.get_dtype()]
        missing = sorted(set(files) - set(checkpoint._shapes))
        if missing:
            raise CheckpointError(f"the index of {str(folder)!r} lists tensors that no shard contains: {missing[:5]!r}")
        return checkpoint

    @property
    def names(self) -> list[str]:
        return sorted(self.files)

    @property
    def tied_embeddings(self) -> bool:
        # Tied: the LM head reuses the input embedding, whether or not the file also stores it.
        return bool(self.config.get("tie_word_embeddings", False))

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[self._known(name)]

    def dtype(self, name: str) -> torch.dtype:
        return self._dtypes[self._known(name)]

    def get(self, name: str) -> torch.Tensor:
        """Load one tensor onto the CPU in its stored dtype."""
        with safe_open(self.files[self._known(name)], framework="pt") as handle:
            return handle.get_tensor(name)

    def numel(self) -> int:
        return sum(_prod(shape) for shape in self._shapes.values())

    def nbytes(self) -> int:
        return sum(_prod(self._shapes[n]) * self._dtypes[n].itemsize for n in self._shapes)

    def _known(self, name: str) -> str:
        if name not in self.files:
            raise CheckpointError(f"tensor {name!r} is not in checkpoint {str(self.folder)!r}")
        return name


def fingerprint(folder: str | Path) -> str:
    """Return `sha256:<hex>` over every tensor's name, shape, dtype and bytes, in name order.

    The result is cached in `deltamux-fingerprint.json` beside the weights, keyed by the size and
    modification time of each shard; where the folder is read-only the cache goes to
    `~/.cache/deltamux/fingerprints/` instead.
    """
    checkpoint = Checkpoint.open(folder)
    stamp = _stamp(checkpoint)
    for cache in _cache_paths(checkpoint.folder):
        try:
            cached = json.loads(cache.read_text())
        except (OSError, ValueError):
            continue
        if cached.get("stamp") == stamp and str(cached.get("fingerprint", "")).startswith("sha256:"):
            return cached["fingerprint"]

    digest = hashlib.sha256()
    for name in checkpoint.names:
        tensor = checkpoint.get(name).contiguous()
        header = json.dumps([name, list(tensor.shape), str(tensor.dtype).removeprefix("torch.")])
        digest.update(header.encode())
        raw = tensor.view(torch.uint8).reshape(-1).numpy() if tensor.numel() else b""
        for start in range(0, len(raw), _HASH_CHUNK):
            digest.update(raw[start : start + _HASH_CHUNK])
        del tensor, raw
    result = f"sha256:{digest.hexdigest()}"

    record = json.dumps({"fingerprint": result, "stamp": stamp}, indent=1)
    for cache in _cache_paths(checkpoint.folder):
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
            tmp.write_text(record)
            tmp.replace(cache)
            break
        except OSError as e:
            logger.debug("cannot cache the fingerprint at %s: %s", cache, e)
    logger.info("fingerprint of %s: %s", checkpoint.folder, result)
    return result


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {str(path)!r}: {e}; the folder needs a valid config.json") from e


def _index_tensors(folder: Path) -> dict[str, Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"invalid shard index {str(index)!r}: {e}; it needs a 'weight_map' object") from e
        files = {}
        for name, shard in weight_map.items():
            path = (folder / shard).resolve()
            if path.parent != folder.resolve() or not path.is_file():
                raise CheckpointError(f"shard {shard!r} named in {str(index)!r} is missing or outside the folder")
            files[name] = path
        return files

    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(
                f"{str(folder)!r} contains only pickle checkpoints ({', '.join(pickles)}), which deltamux does not load "
                "because unpickling can run arbitrary code. Convert them once with transformers: "
                "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(DIR, safe_serialization=True)"
            )
        raise CheckpointError(f"no *.safetensors files in {str(folder)!r}; pass a Hugging Face checkpoint folder")
    files: dict[str, Path] = {}
    for shard in shards:
        try:
            with safe_open(shard, framework="pt") as handle:
                for name in handle.keys():
                    if name in files:
                        raise CheckpointError(f"tensor {name!r} appears in both {files[name].name!r} and {shard.name!r}")
                    files[name] = shard
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own error types for a bad header
            raise CheckpointError(f"cannot read {str(shard)!r}: {e}") from e
    return files


def _stamp(checkpoint: Checkpoint) -> list:
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(set(checkpoint.files.values()))]


def _cache_paths(folder: Path) -> list[Path]:
    key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]
    user_cache = Path(os.environ.get("DELTAMUX_CACHE", Path.home() / ".cache" / "deltamux"))
    return [folder / FINGERPRINT_FILE, user_cache / "fingerprints" / f"{key}.json"]


def _prod(shape: tuple[int, ...]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

"""Write base plus delta as an ordinary Hugging Face folder that transformers loads as is."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from deltastore.apply import DecodedDelta, apply, decode_entry
from deltastore.checkpoint import FINGERPRINT_FILE, Checkpoint, fingerprint
from deltastore.format import DeltaFormatError, Entry, read_delta

logger = logging.getLogger(__name__)

# Files of the base folder that are not copied: its weights (rewritten) and its fingerprint cache,
# which would describe the base rather than the reconstructed model.
_SKIPPED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
_SKIPPED_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json", FINGERPRINT_FILE)


class ReconstructError(ValueError):
    """The output folder of a reconstruction cannot be written."""


def add_entry(weight: torch.Tensor, entry: Entry) -> torch.Tensor:
    """Return `weight + delta` as a new tensor, through the same code as an in-place apply.

    So a reconstructed model equals the base with the delta applied in place, bit for bit,
    for every entry kind (sparse, dense, rows, columns).
    """
    if tuple(weight.shape) != tuple(entry.shape):
        raise DeltaFormatError(f"delta tensor of shape {tuple(entry.shape)} does not fit weight of shape {tuple(weight.shape)}")
    result = weight.clone().contiguous()
    decoded = DecodedDelta(task="reconstruct", tensors=[decode_entry("weight", entry)], device=result.device)
    apply({"weight": result}, decoded)
    return result


def _check_output(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ReconstructError(f"output {str(out)!r} already exists and is not an empty folder; pass a new folder")


def reconstruct(delta_path: str | Path, base: str | Path, out: str | Path) -> Path:
    """Write the folder `out`: the base's config and tokenizer files plus model.safetensors of base + delta.

    The delta's checksum and base fingerprint are verified first. The folder is built under a
    temporary name beside `out` and renamed into place, so `out` never contains a partial model.
    """
    out = Path(out)
    _check_output(out)

    # 1. Read the delta and check that it was made for this base.
    checkpoint = Checkpoint.open(base)
    delta = read_delta(delta_path, expected_fingerprint=fingerprint(base))
    for name, info in delta.metadata.tensors.items():
        if name not in checkpoint.files:
            raise DeltaFormatError(f"delta tensor {name!r} is not in base {str(base)!r}; it was made for another architecture")
        if checkpoint.shape(name) != info.shape:
            raise DeltaFormatError(f"delta tensor {name!r} has shape {info.shape} but the base's has {checkpoint.shape(name)}")

    # 2. Add the delta tensor by tensor; the result is one model held in memory.
    tensors: dict[str, torch.Tensor] = {}
    for name in tqdm(checkpoint.names, desc="reconstruct", unit="tensor", leave=False):
        weight = checkpoint.get(name)
        entry = delta.entries.get(name)
        tensors[name] = weight if entry is None else add_entry(weight, entry)

    # 3. Write into a temporary folder beside `out`, then rename it into place.
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        for source in sorted(checkpoint.folder.iterdir()):
            if source.is_file() and source.suffix not in _SKIPPED_SUFFIXES and source.name not in _SKIPPED_NAMES:
                shutil.copy2(source, staging / source.name)
        # transformers reads the "format" entry to pick the framework of a safetensors file.
        save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
        _check_output(out)
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("reconstructed %s from %s and %s (%d delta tensors)", out, base, delta_path, len(delta.entries))
    return out

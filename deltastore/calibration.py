"""Calibration and validation files, token windows, and the input feature norms WANDA needs.

Calibration text is unlabelled: a plain text file with one sample per line, or a JSONL file
(`.jsonl` / `.json`) whose lines are objects with a `text` field. Validation files are JSONL with
`prompt` and `completion` and an optional `answer`, the string that exact match compares against.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl", ".json")
DEFAULT_WINDOW_TOKENS = 256
DEFAULT_MAX_WINDOWS = 64


class CalibrationError(ValueError):
    """A calibration or validation file is missing, empty or has an invalid line."""


@dataclass(frozen=True)
class ValidationSample:
    """One labelled example: the prompt, its expected completion and an optional short answer.

    `prompt` is plain text, or chat messages that scoring renders with the model's chat template.
    """

    prompt: str | tuple[dict[str, str], ...]
    completion: str
    answer: str | None = None


def _read_lines(path: str | Path, *, kind: str) -> tuple[Path, list[tuple[int, str]]]:
    """Return the non-blank lines of `path` with their 1-based line numbers."""
    path = Path(path)
    if not path.exists():
        raise CalibrationError(f"{kind} file {str(path)!r} does not exist; pass an existing file")
    if not path.is_file():
        raise CalibrationError(f"{kind} path {str(path)!r} is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CalibrationError(f"cannot read {kind} file {str(path)!r}: {e}") from e
    lines = [(number, line) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not lines:
        raise CalibrationError(f"{kind} file {str(path)!r} is empty; it needs at least one sample")
    return path, lines


def _parse_json_object(path: Path, number: int, line: str, *, kind: str) -> dict:
    try:
        record = json.loads(line)
    except ValueError as e:
        raise CalibrationError(f"{kind} file {str(path)!r}, line {number}: invalid JSON ({e})") from e
    if not isinstance(record, dict):
        raise CalibrationError(
            f"{kind} file {str(path)!r}, line {number}: expected a JSON object, got {type(record).__name__}"
        )
    return record


def _string_field(record: dict, key: str, *, path: Path, number: int, kind: str, required: bool) -> str | None:
    value = record.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise CalibrationError(
            f"{kind} file {str(path)!r}, line {number}: field {key!r} must be a non-empty string, got {value!r}"
        )
    return value


def _messages_field(messages: list, *, path: Path, number: int) -> tuple[dict[str, str], ...]:
    valid = bool(messages) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
    )
    if not valid:
        raise CalibrationError(
            f"validation file {str(path)!r}, line {number}: a list 'prompt' must hold chat messages "
            f"with string 'role' and 'content', got {messages!r:.200}"
        )
    return tuple({"role": m["role"], "content": m["content"]} for m in messages)


def read_calibration(path: str | Path) -> list[str]:
    """Read unlabelled calibration samples: one per line, or the `text` field of each JSONL line."""
    path, lines = _read_lines(path, kind="calibration")
    if path.suffix.lower() not in JSONL_SUFFIXES:
        return [line for _, line in lines]

    samples = []
    for number, line in lines:
        record = _parse_json_object(path, number, line, kind="calibration")
        samples.append(_string_field(record, "text", path=path, number=number, kind="calibration", required=True))
    return samples


def read_validation(path: str | Path) -> list[ValidationSample]:
    """Read labelled samples from a JSONL file with `prompt`, `completion` and optional `answer`."""
    path, lines = _read_lines(path, kind="validation")
    samples = []
    for number, line in lines:
        record = _parse_json_object(path, number, line, kind="validation")
        fields = {
            key: _string_field(record, key, path=path, number=number, kind="validation", required=key != "answer")
            for key in ("completion", "answer")
        }
        prompt = record.get("prompt")
        if isinstance(prompt, list):
            fields["prompt"] = _messages_field(prompt, path=path, number=number)
        else:
            fields["prompt"] = _string_field(record, "prompt", path=path, number=number, kind="validation", required=True)
        samples.append(ValidationSample(**fields))
    return samples


def token_windows(
    tokenizer,
    texts: list[str],
    *,
    window_tokens: int = DEFAULT_WINDOW_TOKENS,
    max_windows: int = DEFAULT_MAX_WINDOWS,
) -> list[torch.Tensor]:
    """Tokenize calibration samples into at most `max_windows` windows of `window_tokens` tokens.

    Each sample is cut into its own windows (no packing across samples), so every window is
    ordinary text. Windows shorter than two tokens are skipped because they have nothing to predict.
    Returns tensors of shape (1, T) with T <= window_tokens.
    """
    if window_tokens < 2:
        raise ValueError(f"window_tokens must be at least 2, got {window_tokens!r}")
    windows: list[torch.Tensor] = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), window_tokens):
            chunk = ids[start : start + window_tokens]
            if len(chunk) >= 2:
                windows.append(torch.tensor([chunk], dtype=torch.long))
            if len(windows) >= max_windows:
                return windows
    if not windows:
        raise CalibrationError("calibration text yields no window of at least 2 tokens; add longer samples")
    return windows


@torch.no_grad()
def collect_input_norms(model: torch.nn.Module, windows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return, for every linear layer, the L2 norm of each input feature over all calibration tokens.

    Keys are the weight names (`<module>.weight`, the checkpoint's tensor names); values are float32
    tensors of shape (in_features,). Forward hooks see every token of every window once.
    """
    sums: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(weight_name: str):
        def hook(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            features = inputs[0].detach().reshape(-1, inputs[0].shape[-1])  # (tokens, in_features)
            # Sum of squares in float64: thousands of tokens of float32 squares lose low bits.
            squares = features.double().pow(2).sum(dim=0).cpu()
            if weight_name in sums:
                sums[weight_name] += squares
            else:
                sums[weight_name] = squares

        return hook

    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            handles.append(module.register_forward_hook(make_hook(f"{module_name}.weight")))
    try:
        device = next(model.parameters()).device
        for window in windows:
            model(input_ids=window.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    logger.info("collected input norms of %d linear layers over %d windows", len(sums), len(windows))
    return {name: total.sqrt().float() for name, total in sums.items()}


class InputMeans:
    """Forward hooks that sum the signed input of every linear layer over all calibration tokens.

    Use it as a context manager around any forward passes, for example the ones that record
    reference logits, so the activations come from that same single pass. `means()` then returns,
    per weight name (`<module>.weight`), the float32 mean input of each feature, shape (in_features,).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self._model = model
        self._sums: dict[str, torch.Tensor] = {}
        self._tokens: dict[str, int] = {}
        self._handles: list = []

    def _hook(self, weight_name: str):
        def hook(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            features = inputs[0].detach().reshape(-1, inputs[0].shape[-1])  # (tokens, in_features)
            # Sum in float64: thousands of tokens of float32 activations lose low bits.
            total = features.double().sum(dim=0).cpu()
            if weight_name in self._sums:
                self._sums[weight_name] += total
                self._tokens[weight_name] += features.shape[0]
            else:
                self._sums[weight_name] = total
                self._tokens[weight_name] = features.shape[0]

        return hook

    def __enter__(self) -> InputMeans:
        for module_name, module in self._model.named_modules():
            if isinstance(module, torch.nn.Linear):
                self._handles.append(module.register_forward_hook(self._hook(f"{module_name}.weight")))
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def means(self) -> dict[str, torch.Tensor]:
        return {name: (total / self._tokens[name]).float() for name, total in self._sums.items() if self._tokens[name]}


@torch.no_grad()
def collect_input_means(model: torch.nn.Module, windows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return, for every linear layer, the signed mean of each input feature over all calibration tokens."""
    device = next(model.parameters()).device
    with InputMeans(model) as hooks:
        for window in windows:
            model(input_ids=window.to(device), use_cache=False)
    means = hooks.means()
    logger.info("collected input means of %d linear layers over %d windows", len(means), len(windows))
    return means

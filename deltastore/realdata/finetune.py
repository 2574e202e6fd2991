"""Full fine-tuning of a causal LM on one task file, with AdamW or AdamR, resumable.

The loss covers completion tokens only. The input embedding and the LM head (tied to it in
SmolLM2) stay frozen. That matrix is a fifth of SmolLM2-135M's weights, so a delta that leaves it
exactly at the base is smaller and never touches the vocabulary matrix shared by every task.

The output folder receives the final model (float32 safetensors, tokenizer, config), `loss.csv`,
`loss.png` where matplotlib is installed, and `finetune.json` with the settings and a summary.
Every `checkpoint_every` steps, `checkpoint/state.pt` stores the trainable weights, the optimizer
state and the step. `--resume` continues from it, and it is deleted once the run finishes.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from deltastore.realdata.adamr import AdamR
from deltastore.realdata.encoding import EncodedExample, collate, encode_example
from deltastore.realdata.tasks import DataFileError, load_examples

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "state.pt"
LOSS_FILE = "loss.csv"
SUMMARY_FILE = "finetune.json"


class FinetuneError(ValueError):
    """Fine-tuning settings or inputs are invalid."""


@dataclass(frozen=True)
class FinetuneConfig:
    """Settings of one fine-tuning run; stored in `finetune.json` and checked on resume."""

    base: str
    data: str
    out: str
    optimizer: str = "adamw"
    steps: int = 100
    batch_size: int = 8
    lr: float = 5e-5
    warmup_steps: int = 10
    max_length: int = 128
    weight_decay: float = 0.0  # AdamW: decay toward zero
    # AdamR: decay toward the base weights, reg_lambda * lr / s per step. With gradients clipped to
    # norm 1.0, s is about 1 / sqrt(trainable weights): 9.7e-5 measured on SmolLM2-135M, so 0.2 at
    # lr 5e-5 pulls each weight about 10 % of the way back per step.
    reg_lambda: float = 0.2
    reg_norm: str = "l2"
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 25


@dataclass(frozen=True)
class FinetuneResult:
    """Summary of a finished run."""

    out: Path
    steps: int
    first_loss: float
    final_loss: float
    seconds: float


def _build_adamw(params: list[torch.nn.Parameter], config: FinetuneConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def _build_adamr(params: list[torch.nn.Parameter], config: FinetuneConfig) -> torch.optim.Optimizer:
    return AdamR(params, lr=config.lr, reg_lambda=config.reg_lambda, norm=config.reg_norm)


OPTIMIZERS: dict[str, Callable[[list[torch.nn.Parameter], FinetuneConfig], torch.optim.Optimizer]] = {
    "adamw": _build_adamw,
    "adamr": _build_adamr,
}

# Settings that may differ between the first run and a resume without changing the result.
_RESUMABLE_CHANGES = {"steps", "checkpoint_every"}


def learning_rate(step: int, config: FinetuneConfig) -> float:
    """Linear warm-up over `warmup_steps`, then cosine decay to zero at `steps` (step counts from 0)."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def batch_indices(step: int, *, examples: int, batch_size: int, seed: int) -> list[int]:
    """Return the example indices of `step`: seeded epoch shuffles, a pure function of the step."""
    indices = []
    position = step * batch_size
    while len(indices) < batch_size:
        epoch, offset = divmod(position, examples)
        order = list(range(examples))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        take = min(batch_size - len(indices), examples - offset)
        indices.extend(order[offset : offset + take])
        position += take
    return indices


def validate_config(config: FinetuneConfig) -> None:
    if config.optimizer not in OPTIMIZERS:
        raise FinetuneError(f"unknown optimizer {config.optimizer!r}; choose one of {sorted(OPTIMIZERS)}")
    for name in ("steps", "batch_size", "max_length", "checkpoint_every"):
        value = getattr(config, name)
        if not isinstance(value, int) or value < 1:
            raise FinetuneError(f"{name} must be a positive integer, got {value!r}")
    if not config.lr > 0:
        raise FinetuneError(f"lr must be positive, got {config.lr!r}")
    if config.warmup_steps < 0 or config.weight_decay < 0 or config.reg_lambda < 0:
        raise FinetuneError("warmup_steps, weight_decay and reg_lambda must be non-negative")
    if not (Path(config.base) / "config.json").is_file():
        raise FinetuneError(f"base folder {config.base!r} has no config.json; run `deltamux fetch-base` or pass a Hugging Face model folder")


def finetune(config: FinetuneConfig, *, resume: bool = False, progress: bool = True) -> FinetuneResult:
    """Fine-tune `config.base` on `config.data` and save the result in `config.out`."""
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # 1. Inputs: validated before anything heavy loads.
    validate_config(config)
    examples = load_examples(config.data)
    out = Path(config.out)
    state_path = out / CHECKPOINT_DIR / CHECKPOINT_FILE
    if resume and not state_path.is_file():
        raise FinetuneError(f"--resume given but {str(state_path)!r} does not exist; start without --resume")
    if not resume and state_path.is_file():
        raise FinetuneError(f"{str(out)!r} contains an unfinished run; pass --resume to continue it or choose another --out")
    torch.manual_seed(config.seed)

    # 2. Model and tokenizer. float32: fine-tuning in half precision would swamp small updates.
    tokenizer = AutoTokenizer.from_pretrained(config.base, local_files_only=True)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(config.base, dtype=torch.float32, local_files_only=True).to(device)
    frozen = _freeze_embeddings(model)
    trainable = {name: param for name, param in model.named_parameters() if param.requires_grad}
    logger.info("training %d tensors (%d weights); frozen: %s", len(trainable), sum(p.numel() for p in trainable.values()), frozen)

    # 3. Data, tokenized once.
    encoded = [encode_example(tokenizer, example, max_length=config.max_length) for example in examples]
    encoded = [item for item in encoded if item.completion_tokens > 0]
    if not encoded:
        raise DataFileError(f"no example of {config.data!r} keeps a completion token within max_length={config.max_length}")
    if len(encoded) < len(examples):
        logger.warning("skipped %d examples whose prompt fills max_length=%d", len(examples) - len(encoded), config.max_length)

    # 4. Optimizer (built on the base weights, so AdamR's theta_pre is the base), then resume.
    optimizer = OPTIMIZERS[config.optimizer](list(trainable.values()), config)
    start_step, history = 0, []
    if resume:
        start_step, history = _load_checkpoint(state_path, config=config, trainable=trainable, optimizer=optimizer)
        logger.info("resuming %s at step %d", out, start_step)
    out.mkdir(parents=True, exist_ok=True)

    # 5. Training loop.
    model.train()
    began = time.monotonic()
    bar = tqdm(range(start_step, config.steps), initial=start_step, total=config.steps, disable=not progress, desc=out.name)
    for step in bar:
        lr = learning_rate(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = _batch(encoded, step=step, config=config, pad_id=pad_id, device=device)
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(trainable.values(), config.grad_clip)
        optimizer.step()

        record = {"step": step + 1, "loss": loss.item(), "lr": lr, "tokens": int((batch["labels"] != -100).sum())}
        if isinstance(optimizer, AdamR):
            record["scale"] = optimizer.last_scale
        history.append(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}")
        if (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps:
            _save_checkpoint(state_path, config=config, step=step + 1, history=history, trainable=trainable, optimizer=optimizer)
    bar.close()
    seconds = time.monotonic() - began

    # 6. Final folder, loss curve and summary; the checkpoint goes once everything else is written.
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _write_loss_curve(out, history)
    result = FinetuneResult(
        out=out, steps=config.steps, first_loss=history[0]["loss"], final_loss=_tail_mean(history), seconds=seconds
    )
    summary = {"config": asdict(config), "result": {**asdict(result), "out": str(out)}, "frozen": frozen}
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=1) + "\n")
    shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
    logger.info("fine-tuned %s in %.0f s: loss %.4f -> %.4f", out, seconds, result.first_loss, result.final_loss)
    return result


def _freeze_embeddings(model: torch.nn.Module) -> list[str]:
    frozen = []
    for module_name, module in (("input embedding", model.get_input_embeddings()), ("LM head", model.get_output_embeddings())):
        if module is not None:
            module.weight.requires_grad_(False)
            frozen.append(module_name)
    return frozen


def _batch(encoded: list[EncodedExample], *, step: int, config: FinetuneConfig, pad_id: int, device: torch.device) -> dict:
    indices = batch_indices(step, examples=len(encoded), batch_size=config.batch_size, seed=config.seed)
    batch = collate([encoded[i] for i in indices], pad_token_id=pad_id)
    return {key: value.to(device) for key, value in batch.items()}


def _save_checkpoint(path: Path, *, config: FinetuneConfig, step: int, history: list[dict], trainable: dict, optimizer) -> None:  # noqa: ANN001
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "config": asdict(config),
        "step": step,
        "history": history,
        "model": {name: param.detach() for name, param in trainable.items()},
        "optimizer": optimizer.state_dict(),
    }
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(state, tmp)
    tmp.replace(path)
    logger.info("checkpoint at step %d: %s", step, path)


def _load_checkpoint(path: Path, *, config: FinetuneConfig, trainable: dict, optimizer) -> tuple[int, list[dict]]:  # noqa: ANN001
    state = torch.load(path, map_location="cpu", weights_only=True)
    saved = state["config"]
    changed = sorted(key for key, value in asdict(config).items() if key not in _RESUMABLE_CHANGES and saved.get(key) != value)
    if changed:
        details = ", ".join(f"{key}: {saved.get(key)!r} -> {getattr(config, key)!r}" for key in changed)
        raise FinetuneError(f"cannot resume {str(path)!r} with different settings ({details}); use the original ones")
    with torch.no_grad():
        for name, param in trainable.items():
            param.copy_(state["model"][name])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"]), list(state["history"])


def _write_loss_curve(out: Path, history: list[dict]) -> None:
    fields = sorted({key for record in history for key in record}, key=["step", "loss", "lr", "tokens", "scale"].index)
    with (out / LOSS_FILE).open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(history)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.plot([r["step"] for r in history], [r["loss"] for r in history], linewidth=1)
    axis.set_xlabel("step")
    axis.set_ylabel("training loss (completion tokens)")
    axis.set_title(out.name)
    figure.tight_layout()
    figure.savefig(out / "loss.png", dpi=100)
    plt.close(figure)


def _tail_mean(history: list[dict], window: int = 10) -> float:
    tail = history[-window:]
    return sum(record["loss"] for record in tail) / len(tail)

"""Server settings, read from keyword arguments, the environment (prefix DELTAMUX_) or the CLI."""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

logger = logging.getLogger(__name__)


class DeviceChoice(enum.StrEnum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


class DtypeChoice(enum.StrEnum):
    AUTO = "auto"
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


class Batching(enum.StrEnum):
    """Batching policy: the rule for which requests may share one generation batch."""

    PER_TASK = "per-task"  # one task per batch, its delta merged into the resident weights
    MIXED = "mixed"  # any tasks per batch: merged weights when one task, else per-row sparse delta products


class SwapMode(enum.StrEnum):
    """Swap mode: the way a task's delta is written onto the resident weights (see deltastore.apply)."""

    EXACT = "exact"  # save the base values, write base + delta; restore is bit-exact
    SUBTRACT = "subtract"  # add the delta, subtract it again; drifts in half precision
    FULL = "full"  # baseline: copy whole fine-tuned tensors in from CPU memory, copy the base back


_TORCH_DTYPES = {
    DtypeChoice.FLOAT32: torch.float32,
    DtypeChoice.BFLOAT16: torch.bfloat16,
    DtypeChoice.FLOAT16: torch.float16,
}


class Settings(BaseSettings):
    """Every setting of `deltamux serve`; each field is also read from DELTAMUX_<NAME>."""

    model_config = SettingsConfigDict(env_prefix="DELTAMUX_", extra="forbid")

    base: Path = Field(description="Hugging Face folder of the base model (config, safetensors, tokenizer).")
    store: Path = Field(description="Folder of <task>.delta.safetensors files; created if missing.")
    device: DeviceChoice = Field(DeviceChoice.AUTO, description="Where the model runs: auto picks cuda when available.")
    dtype: DtypeChoice = Field(DtypeChoice.AUTO, description="Weight dtype: auto is bfloat16 on CUDA and float32 on CPU.")
    host: str = Field("127.0.0.1", description="Address uvicorn binds to.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port uvicorn binds to.")
    max_batch_size: int = Field(8, ge=1, le=1024, description="Maximum same-task requests generated together.")
    time_slice: float = Field(
        0.5, gt=0, description="Seconds the engine keeps serving one task while other tasks have requests waiting."
    )
    max_batch_wait: float = Field(
        0.005,
        ge=0,
        description="Seconds the engine waits for more same-task requests before it starts a partial batch.",
    )
    device_cache_bytes: int = Field(
        2 << 30, ge=0, description="Byte budget for decoded deltas kept on the model's device."
    )
    cpu_cache_bytes: int = Field(4 << 30, ge=0, description="Byte budget for delta files kept in CPU memory.")
    swap_mode: SwapMode = Field(SwapMode.EXACT, description="exact (bit-exact restore), or the baselines subtract and full (whole-tensor copies).")
    batching: Batching = Field(
        Batching.PER_TASK,
        description="per-task (every batch serves one task) or mixed (a batch may mix tasks; see docs/architecture.md).",
    )
    max_tokens_default: int = Field(
        256, ge=1, description="Completion tokens generated when a request sets no max_tokens."
    )
    max_queued_requests: int = Field(
        1024, ge=1, description="Requests waiting over all task queues before new ones get 429 Too Many Requests."
    )
    max_upload_bytes: int = Field(16 << 30, ge=1, description="Largest delta file POST /v1/deltas accepts.")
    base_name: str | None = Field(
        None, description="Model id that serves the base itself; defaults to the base folder's name."
    )
    log_level: str = Field("INFO", description="Logging level of the entry point (DEBUG, INFO, WARNING, ...).")
    api_keys_file: Path | None = Field(
        None, description="JSON file of API keys (name, key, tasks, admin); with keys, every /v1 route needs one."
    )
    api_keys: SecretStr | None = Field(
        None, description="The same JSON as api_keys_file, given inline; set it only through DELTAMUX_API_KEYS."
    )
    metrics_require_key: bool = Field(
        False, description="Serve /metrics only to admin keys (its labels name every task); needs API keys."
    )
    max_queued_per_task: int = Field(
        256, ge=1, description="Requests waiting for one task before new ones for it get 429 Too Many Requests."
    )
    retry_after: int = Field(1, ge=0, description="Seconds sent in the Retry-After header of a 429 response.")
    request_timeout: float = Field(
        600.0, gt=0, description="Seconds a completion may take, queueing included, before it fails with 504."
    )
    max_request_bytes: int = Field(
        4 << 20, ge=1, description="Largest JSON request body in bytes; larger ones get 413 (uploads: max_upload_bytes)."
    )
    shutdown_timeout: float = Field(
        30.0, ge=0, description="Seconds a SIGTERM waits for in-flight requests before it cancels them."
    )

    @model_validator(mode="after")
    def _check_batching(self) -> Settings:
        if self.batching == Batching.MIXED and self.swap_mode == SwapMode.FULL:
            raise ValueError(
                "batching 'mixed' adds decoded deltas per row, which swap mode 'full' does not keep; "
                "use swap mode 'exact' or 'subtract' with it, or batching 'per-task'"
            )
        return self


@dataclass(frozen=True)
class Placement:
    """The device and dtype the model is loaded with, and why that dtype."""

    device: torch.device
    dtype: torch.dtype
    reason: str


def resolve_placement(settings: Settings) -> Placement:
    """Turn the auto choices into a concrete device and dtype."""
    cuda = torch.cuda.is_available()
    if settings.device == DeviceChoice.CUDA and not cuda:
        raise ValueError("device 'cuda' was requested but torch.cuda.is_available() is False; use --device cpu or auto")
    use_cuda = settings.device == DeviceChoice.CUDA or (settings.device == DeviceChoice.AUTO and cuda)
    device = torch.device("cuda") if use_cuda else torch.device("cpu")

    if settings.dtype != DtypeChoice.AUTO:
        return Placement(device=device, dtype=_TORCH_DTYPES[settings.dtype], reason="set explicitly")
    if device.type == "cuda":
        reason = "auto: bfloat16 on CUDA halves weight memory and keeps float32's exponent range"
        return Placement(device=device, dtype=torch.bfloat16, reason=reason)
    reason = "auto: float32 on CPU, where half-precision matmuls are slow and batched greedy output stays exact"
    return Placement(device=device, dtype=torch.float32, reason=reason)

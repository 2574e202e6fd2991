"""Helpers for the server tests: delta files from the tiny fine-tunes, reference models, a live server."""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
import uvicorn
from fastapi import FastAPI
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from deltastore.apply import model_params
from deltastore.checkpoint import Checkpoint, fingerprint
from deltastore.format import DenseEntry, Entry, SparseEntry, StructuredEntry, read_delta, write_delta
from server.app import create_app
from server.settings import Settings


def make_delta(
    base: Path, finetune: Path, out: Path, *, task: str, keep: float = 0.6, seed: int = 0,
    base_fingerprint: str | None = None,
) -> Path:
    """Write a delta of `finetune` against `base`: a random `keep` share of each 2-D delta, norms dense."""
    base_ckpt, ft_ckpt = Checkpoint.open(base), Checkpoint.open(finetune)
    generator = torch.Generator().manual_seed(seed)
    entries: dict[str, Entry] = {}
    for name in base_ckpt.names:
        delta = ft_ckpt.get(name).float() - base_ckpt.get(name).float()
        if not bool(delta.any()):
            continue
        if delta.dim() == 1:
            entries[name] = DenseEntry(shape=tuple(delta.shape), values=delta)
            continue
        flat = delta.reshape(-1)
        keep_mask = torch.rand(flat.numel(), generator=generator) < keep
        indices = keep_mask.nonzero().squeeze(-1)
        entries[name] = SparseEntry(shape=tuple(delta.shape), indices=indices, values=flat[indices])
    write_delta(
        out / f"{task}.delta.safetensors", task=task, base_fingerprint=base_fingerprint or fingerprint(base),
        method="dare", params={"drop_rate": 1 - keep, "seed": seed}, entries=entries,
    )
    return out / f"{task}.delta.safetensors"


def reference_model(base: Path, delta_path: Path | None) -> PreTrainedModel:
    """Load `base` in float32 and add the delta file's stored values, as the server's exact apply does."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    if delta_path is None:
        return model
    params = model_params(model)
    with torch.no_grad():
        for name, entry in read_delta(delta_path).entries.items():
            weight = params[name].data
            if isinstance(entry, DenseEntry):
                weight.copy_(weight.float() + entry.values)
            elif isinstance(entry, StructuredEntry):
                lines = weight.index_select(entry.axis, entry.indices)
                weight.index_copy_(entry.axis, entry.indices, lines.float() + entry.values)
            else:
                flat = weight.view(-1)
                flat[entry.indices] = flat[entry.indices].float() + entry.values
    return model


def greedy_text(model: PreTrainedModel, tokenizer, prompt_ids: list[int], *, max_tokens: int) -> tuple[str, int]:
    """Return the greedy completion text and its token count (with the end token) from plain `generate`."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=max_tokens, do_sample=False,
        )
    new = out[0, len(prompt_ids) :].tolist()
    return tokenizer.decode(new, skip_special_tokens=True), len(new)


def weights_hash(params: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(params):
        digest.update(name.encode())
        digest.update(params[name].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass
class LiveServer:
    """A uvicorn server on 127.0.0.1 in a background thread."""

    app: FastAPI
    server: uvicorn.Server
    thread: threading.Thread
    base_url: str
    store: Path

    @property
    def runtime(self):
        return self.app.state.runtime

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


def start_server(settings: Settings, *, ready_timeout: float = 120.0, wait_path: str = "/ready") -> LiveServer:
    """Start the app on a loopback socket bound here (port 0), so no other process can take the port.

    Returns once `wait_path` returns 200, or once it responds at all when `wait_path` is /health
    (which is 503 after a failed load).
    """
    app = create_app(settings)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_config=None, lifespan="on", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if not thread.is_alive():
            raise RuntimeError("the server thread exited during start-up; see the log above")
        try:
            status = httpx.get(f"{base_url}{wait_path}", timeout=2).status_code
            if status == 200 or wait_path == "/health":
                return LiveServer(app=app, server=server, thread=thread, base_url=base_url, store=Path(settings.store))
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    server.should_exit = True
    raise TimeoutError(f"the server at {base_url} was not ready within {ready_timeout} s")


def tokenizer_for(base: Path):
    return AutoTokenizer.from_pretrained(base)

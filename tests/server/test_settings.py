"""Settings from keywords, the environment and `deltamux serve` flags."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from server import serve_cli
from server.settings import Settings, SwapMode, resolve_placement


def test_environment_prefix(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DELTAMUX_BASE", str(tmp_path / "base"))
    monkeypatch.setenv("DELTAMUX_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("DELTAMUX_PORT", "8123")
    monkeypatch.setenv("DELTAMUX_SWAP_MODE", "subtract")
    settings = Settings()
    assert settings.base == tmp_path / "base"
    assert settings.port == 8123
    assert settings.swap_mode == SwapMode.SUBTRACT


def test_keywords_override_environment(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DELTAMUX_PORT", "8123")
    assert Settings(base=tmp_path, store=tmp_path, port=9001).port == 9001


@pytest.mark.parametrize(
    "kwargs",
    [{"port": 70000}, {"dtype": "int8"}, {"device": "tpu"}, {"max_batch_size": 0}, {"swap_mode": "lazy"}, {"time_slice": 0}],
)
def test_invalid_values_rejected(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValidationError):
        Settings(base=tmp_path, store=tmp_path, **kwargs)


def test_auto_dtype_on_cpu_is_float32(tmp_path: Path) -> None:
    placement = resolve_placement(Settings(base=tmp_path, store=tmp_path, device="cpu"))
    assert placement.device == torch.device("cpu")
    assert placement.dtype == torch.float32
    assert "float32 on CPU" in placement.reason


def test_explicit_dtype_kept(tmp_path: Path) -> None:
    placement = resolve_placement(Settings(base=tmp_path, store=tmp_path, device="cpu", dtype="bfloat16"))
    assert placement.dtype == torch.bfloat16


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_without_device_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cuda"):
        resolve_placement(Settings(base=tmp_path, store=tmp_path, device="cuda"))


def _serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deltamux")
    serve_cli.add_commands(parser.add_subparsers(dest="command"))
    return parser


def test_serve_flags_map_to_settings(tmp_path: Path) -> None:
    args = _serve_parser().parse_args(
        ["serve", "--base", str(tmp_path), "--store", str(tmp_path / "s"), "--port", "8200", "--max-batch-size", "3",
         "--dtype", "float16"]
    )
    assert args.func is serve_cli.run_serve
    explicit = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    settings = Settings(**explicit)
    assert settings.port == 8200
    assert settings.max_batch_size == 3
    assert settings.dtype == "float16"
    assert settings.host == "127.0.0.1"


def test_serve_rejects_invalid_value(tmp_path: Path, caplog) -> None:
    args = _serve_parser().parse_args(["serve", "--base", str(tmp_path), "--store", str(tmp_path), "--port", "x"])
    assert serve_cli.run_serve(args) == 2
    assert "--port" in caplog.text


def test_serve_rejects_unknown_choice(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        _serve_parser().parse_args(["serve", "--base", str(tmp_path), "--store", str(tmp_path), "--device", "tpu"])

"""CLI checks: inspect verifies the checksum, compress rejects empty deltas and reports rounded drop rates."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from deltastore import cli
from deltastore.format import DenseEntry, SparseEntry, read_delta, write_delta
from deltastore.methods import effective_drop_rate
from tests.deltastore.test_cli import assert_one_line_error, compress_args, run

FINGERPRINT = "sha256:" + "1" * 64


@pytest.fixture
def store(tmp_path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def delta_file(tiny_base, tiny_finetunes, store) -> Path:
    assert run(*compress_args(tiny_base, tiny_finetunes["alpha"], store)) == 0
    return store / "alpha.delta.safetensors"


def _calibration(tmp_path: Path) -> Path:
    path = tmp_path / "calibration.txt"
    path.write_text("The quick brown fox jumps over the lazy dog.\nWhat is two plus two? The answer is four.\n")
    return path


# -- inspect --------------------------------------------------------------------------------------


def test_inspect_reports_checksum(delta_file, capsys):
    assert run("inspect", delta_file) == cli.EXIT_OK
    checksum_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("checksum"))
    assert "OK" in checksum_line


def test_inspect_json_reports_checksum(delta_file, capsys):
    assert run("inspect", delta_file, "--json") == cli.EXIT_OK
    assert '"checksum_verified": true' in capsys.readouterr().out


def test_inspect_damaged_payload_fails(delta_file, capsys):
    data = bytearray(delta_file.read_bytes())
    data[-3] ^= 0xFF  # inside the last array, so the header still parses
    delta_file.write_bytes(bytes(data))
    assert run("inspect", delta_file) == cli.EXIT_VERIFY_FAILED
    captured = capsys.readouterr()
    assert "checksum" in captured.err
    assert "FAILED" in captured.err
    assert "tensor" not in captured.out  # no table for a damaged file


def test_inspect_natural_layer_order(tmp_path, capsys):
    entries = {
        f"model.layers.{layer}.mlp.up_proj.weight": SparseEntry(
            shape=(4, 4), indices=torch.tensor([0, 5]), values=torch.tensor([0.5, -0.25])
        )
        for layer in (10, 2, 1, 0)
    }
    entries["model.norm.weight"] = DenseEntry(shape=(4,), values=torch.full((4,), 0.125))
    path = tmp_path / "layers.delta.safetensors"
    write_delta(
        path, task="layers", base_fingerprint=FINGERPRINT, method="dare", params={"drop_rate": 0.5, "seed": 0},
        entries=entries,
    )
    assert run("inspect", path) == cli.EXIT_OK
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith("model.")]
    assert names == [
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.1.mlp.up_proj.weight",
        "model.layers.2.mlp.up_proj.weight",
        "model.layers.10.mlp.up_proj.weight",
        "model.norm.weight",
    ]


def test_natural_key_orders_numbers():
    names = ["layers.10.q", "layers.2.q", "layers.1.k", "embed"]
    assert sorted(names, key=cli.natural_key) == ["embed", "layers.1.k", "layers.2.q", "layers.10.q"]


# -- compress: empty deltas -----------------------------------------------------------------------


def test_compress_identical_checkpoints_rejected(tiny_base, store, capsys):
    assert run(*compress_args(tiny_base, tiny_base, store)) == cli.EXIT_INVALID_INPUT
    assert_one_line_error(capsys, "equals the base", "nothing to store", "--allow-empty")
    assert not (store / "alpha.delta.safetensors").exists()


def test_compress_identical_allowed_when_asked(tiny_base, store, capsys, caplog):
    with caplog.at_level(logging.WARNING, logger="deltastore.compress"):
        assert run(*compress_args(tiny_base, tiny_base, store, "--allow-empty")) == cli.EXIT_OK
    assert "equals the base" in caplog.text
    assert read_delta(store / "alpha.delta.safetensors").metadata.nnz == 0


def test_compress_everything_dropped_rejected(tiny_base, tiny_finetunes, store, capsys):
    argv = compress_args(tiny_base, tiny_finetunes["alpha"], store, "--other-tensors", "drop")
    argv[argv.index("dare")] = "magnitude"
    argv[argv.index("0.9")] = "0.9999"  # 48 x 48 weights keep round(0.23) = 0 entries
    assert run(*argv) == cli.EXIT_INVALID_INPUT
    assert_one_line_error(capsys, "every delta value was dropped", "lower --drop-rate")
    assert not (store / "alpha.delta.safetensors").exists()


# -- compress: effective drop rate ----------------------------------------------------------------


def test_wanda_effective_drop_rate_recorded(tiny_base, tiny_finetunes, store, tmp_path, capsys, caplog):
    argv = compress_args(tiny_base, tiny_finetunes["alpha"], store, "--calibration", _calibration(tmp_path))
    argv[argv.index("dare")] = "wanda"
    argv[argv.index("0.9")] = "0.98"  # 48 input features keep round(0.96) = 1 per row, 2.08 % instead of 2 %
    with caplog.at_level(logging.WARNING, logger="deltastore.compress"):
        assert run(*argv) == cli.EXIT_OK

    metadata = read_delta(store / "alpha.delta.safetensors").metadata
    shapes = [info.shape for info in metadata.tensors.values() if info.kind == "sparse"]
    effective = metadata.params["effective_drop_rate"]
    assert effective == pytest.approx(effective_drop_rate("wanda", shapes, 0.98))
    assert effective < 0.98
    assert metadata.params["drop_rate"] == 0.98
    assert "0.98" in caplog.text
    assert f"{effective:.6g}" in caplog.text
    assert f"(effective {effective:.6g})" in capsys.readouterr().out


def test_wanda_rate_on_smollm2_shapes():
    # One SmolLM2-135M layer: hidden size 576, 3 KV heads of 64, MLP size 1536. Every row keeps
    # round(0.576) = 1 entry, down_proj rows round(1.536) = 2: 5760 of 3538944 entries.
    shapes = [(576, 576)] * 2 + [(192, 576)] * 2 + [(1536, 576)] * 2 + [(576, 1536)]
    assert effective_drop_rate("wanda", shapes, 0.999) == pytest.approx(1 - 5760 / 3538944)
    assert effective_drop_rate("dare", shapes, 0.999) is None


def test_magnitude_rate_not_reported_when_exact(tiny_base, tiny_finetunes, store, capsys, caplog):
    argv = compress_args(tiny_base, tiny_finetunes["alpha"], store)
    argv[argv.index("dare")] = "magnitude"
    argv[argv.index("0.9")] = "0.75"  # 2304 * 0.25 = 576 entries exactly
    with caplog.at_level(logging.WARNING, logger="deltastore.compress"):
        assert run(*argv) == cli.EXIT_OK
    assert read_delta(store / "alpha.delta.safetensors").metadata.params["effective_drop_rate"] == pytest.approx(0.75, abs=1e-3)
    assert "drops" not in caplog.text
    assert "effective" not in capsys.readouterr().out

"""Per-layer analytical q: the per-row objective, the activation hooks, and the compression pipeline."""

from __future__ import annotations

import math

import pytest
import torch

from deltastore.calibration import collect_input_means
from deltastore.compress import compress
from deltastore.format import read_delta
from deltastore.methods import PruneOptions, prune
from deltastore.perlayer import ETA_GRID, RowSums, layer_q, layer_qs, phi, q_grid, row_q, row_sums

Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


def _objective(q: float, total: float, squares: float, *, drop_rate: float, eta: float) -> float:
    """The per-row objective, written out for one row and one q."""
    return abs(eta * (1 - (1 - drop_rate) / q) * total + eta**2 * phi(drop_rate) * squares / (4 * q**2) + math.log(2 / 0.05))


def test_phi_limits_and_value() -> None:
    assert phi(0.0) == 0.0
    assert phi(0.5) == 0.5
    assert phi(0.9) == pytest.approx((1 - 1.8) / math.log(0.1 / 0.9))
    assert phi(0.5 + 1e-7) == pytest.approx(0.5, abs=1e-6)


def test_q_grid_spans_dare_to_below_one() -> None:
    grid = q_grid(0.9)
    assert float(grid[0]) == pytest.approx(0.1)
    assert float(grid[-1]) < 1.0
    assert float(grid[-1]) == pytest.approx(0.999)
    assert grid.numel() == 900
    assert q_grid(0.0).numel() == 0


@pytest.mark.parametrize("drop_rate", [0.3, 0.5, 0.9, 0.99])
def test_row_q_within_range(drop_rate: float) -> None:
    generator = torch.Generator().manual_seed(0)
    sums = RowSums(total=torch.randn(53, generator=generator, dtype=torch.float64) * 50,
                   squares=torch.rand(53, generator=generator, dtype=torch.float64) * 1e4)

    for eta in ETA_GRID:
        values = row_q(sums, drop_rate=drop_rate, eta=eta)
        assert bool((values >= 1 - drop_rate - 1e-12).all())
        assert bool((values < 1.0).all())
        assert 1 - drop_rate - 1e-12 <= layer_q(sums, drop_rate=drop_rate, eta=eta) <= 1.0


def test_row_q_is_grid_argmin_of_objective() -> None:
    # Negative S lets the bias term cancel log(2 / gamma) inside the range, so the minimum is interior.
    cases = [(-60.0, 30.0), (-9.0, 400.0), (4.0, 2.0), (-0.5, 0.0)]
    sums = RowSums(total=torch.tensor([c[0] for c in cases], dtype=torch.float64),
                   squares=torch.tensor([c[1] for c in cases], dtype=torch.float64))

    chosen = row_q(sums, drop_rate=0.8, eta=0.3)

    for row, (total, squares) in enumerate(cases):
        candidates = [0.2 + 0.001 * k for k in range(800)]
        best = min(candidates, key=lambda q: _objective(q, total, squares, drop_rate=0.8, eta=0.3))
        assert float(chosen[row]) == pytest.approx(best, abs=1e-9), (total, squares)
    assert 0.2 < float(chosen[0]) < 0.999


def test_drop_rate_zero_gives_q_one() -> None:
    sums = RowSums(total=torch.ones(3, dtype=torch.float64), squares=torch.ones(3, dtype=torch.float64))
    assert layer_q(sums, drop_rate=0.0, eta=0.5) == 1.0


def test_row_sums_include_bias_column() -> None:
    delta = torch.tensor([[1.0, 2.0, 0.0], [0.5, -1.0, 3.0]])
    mean_input = torch.tensor([0.5, -1.0, 2.0])
    bias = torch.tensor([0.25, -0.5])

    sums = row_sums(delta, mean_input, bias_delta=bias)

    assert sums.total.tolist() == pytest.approx([0.5 - 2.0 + 0.25, 0.25 + 1.0 + 6.0 - 0.5])
    assert sums.squares.tolist() == pytest.approx([0.25 + 4.0 + 0.0625, 0.0625 + 1.0 + 36.0 + 0.25])


def test_tensors_without_activations_get_mean_q() -> None:
    sums = {
        "a": RowSums(total=torch.tensor([-60.0], dtype=torch.float64), squares=torch.tensor([30.0], dtype=torch.float64)),
        "b": RowSums(total=torch.tensor([5.0], dtype=torch.float64), squares=torch.tensor([1.0], dtype=torch.float64)),
    }

    values = layer_qs(sums, ["a", "b", "embed"], drop_rate=0.8, eta=0.3)

    assert values["embed"] == pytest.approx((values["a"] + values["b"]) / 2)


class _Toy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(11, 5)
        self.proj = torch.nn.Linear(5, 3)

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> torch.Tensor:
        return self.proj(self.embed(input_ids))


def test_input_means_over_all_tokens() -> None:
    torch.manual_seed(0)
    model = _Toy()
    windows = [torch.tensor([[1, 2, 3]]), torch.tensor([[4, 10]])]

    means = collect_input_means(model, windows)

    tokens = torch.tensor([1, 2, 3, 4, 10])
    expected = model.embed.weight[tokens].mean(dim=0)
    assert set(means) == {"proj.weight"}
    assert torch.allclose(means["proj.weight"], expected.detach(), atol=1e-6)


@pytest.fixture
def calibration_file(tmp_path):
    path = tmp_path / "calibration.txt"
    path.write_text("The quick brown fox jumps over the lazy dog.\nWhat is two plus two? The answer is four.\n")
    return path


def _float32_delta(base, finetuned, name: str) -> torch.Tensor:
    from deltastore.checkpoint import Checkpoint

    return Checkpoint.open(finetuned).get(name).float() - Checkpoint.open(base).get(name).float()


def test_fixed_eta_scales_each_layer(tmp_path, tiny_base, tiny_finetunes, calibration_file) -> None:
    metadata = compress(
        base=tiny_base, finetuned=tiny_finetunes["alpha"], task="alpha", store=tmp_path, method="darex-q",
        drop_rate=0.9, q_select="per-layer", eta=0.4, calibration=calibration_file, value_dtype="float32",
        window_tokens=16, max_windows=2,
    )

    layer_q_values = metadata.params["q_layers"]
    pruned = [name for name, info in metadata.tensors.items() if info.kind == "sparse"]
    assert sorted(layer_q_values) == sorted(pruned)
    assert len(pruned) == 14
    assert metadata.params["eta"] == 0.4
    assert metadata.params["q"] is None
    assert all(0.1 - 1e-12 <= value <= 1.0 for value in layer_q_values.values())
    delta = read_delta(tmp_path / "alpha.delta.safetensors")
    for name in (Q_PROJ, "model.layers.1.mlp.down_proj.weight"):
        expected = prune(
            _float32_delta(tiny_base, tiny_finetunes["alpha"], name), method="darex-q", name=name,
            options=PruneOptions(drop_rate=0.9, q=layer_q_values[name]),
        )
        assert torch.equal(delta.entries[name].indices, expected.indices), name
        assert torch.equal(delta.entries[name].values, expected.values), name


def test_layer_alone_equals_global_q(tmp_path, tiny_base, tiny_finetunes, calibration_file) -> None:
    # With one pruned layer, the per-layer result is a global darex-q at that layer's q, bit for bit.
    common = dict(base=tiny_base, finetuned=tiny_finetunes["alpha"], task="alpha", method="darex-q", drop_rate=0.8,
                  include=[Q_PROJ], value_dtype="float32")
    per_layer = compress(store=tmp_path / "per-layer", q_select="per-layer", eta=0.6, calibration=calibration_file,
                         window_tokens=16, max_windows=2, **common)
    (name, q), = per_layer.params["q_layers"].items()
    global_q = compress(store=tmp_path / "global", q=q, **common)

    first = read_delta(tmp_path / "per-layer" / "alpha.delta.safetensors").entries
    second = read_delta(tmp_path / "global" / "alpha.delta.safetensors").entries
    assert name == Q_PROJ
    assert sorted(first) == sorted(second)
    for tensor in first:
        assert torch.equal(first[tensor].values, second[tensor].values), tensor
    assert global_q.nnz == per_layer.nnz


def test_eta_search_by_output_change(tmp_path, tiny_base, tiny_finetunes, calibration_file) -> None:
    metadata = compress(
        base=tiny_base, finetuned=tiny_finetunes["alpha"], task="alpha", store=tmp_path, method="darex-q",
        drop_rate=0.9, q_select="per-layer", calibration=calibration_file, window_tokens=16, max_windows=2,
    )

    search = metadata.params["q_search"]
    assert search["parameter"] == "eta"
    assert search["metric"] == "top-5 logit MSE"
    etas = [point[0] for point in search["trace"]]
    assert etas[: len(ETA_GRID)] == pytest.approx(list(ETA_GRID))
    assert search["score"] == min(point[1] for point in search["trace"])
    assert metadata.params["eta"] in etas


def test_per_layer_needs_calibration(tmp_path, tiny_base, tiny_finetunes) -> None:
    with pytest.raises(ValueError, match="'per-layer' needs a calibration"):
        compress(base=tiny_base, finetuned=tiny_finetunes["alpha"], task="alpha", store=tmp_path, method="darex-q",
                 drop_rate=0.9, q_select="per-layer")


def test_eta_without_per_layer_rejected(tmp_path, tiny_base, tiny_finetunes) -> None:
    with pytest.raises(ValueError, match="eta 0.3 applies to --q-select per-layer only"):
        compress(base=tiny_base, finetuned=tiny_finetunes["alpha"], task="alpha", store=tmp_path, method="darex-q",
                 drop_rate=0.9, q=0.5, eta=0.3)


def test_inspect_lists_layer_q(tmp_path, tiny_base, tiny_finetunes, calibration_file, capsys) -> None:
    import argparse

    from deltastore import cli

    parser = argparse.ArgumentParser(prog="deltamux")
    cli.add_commands(parser.add_subparsers(dest="command"))
    argv = ["compress", "--base", tiny_base, "--finetuned", tiny_finetunes["alpha"], "--task", "alpha", "--store", tmp_path,
            "--method", "darex-q", "--drop-rate", "0.9", "--q-select", "per-layer", "--eta", "0.5",
            "--calibration", calibration_file, "--window-tokens", "16", "--max-windows", "2"]
    args = parser.parse_args([str(arg) for arg in argv])
    assert args.func(args) == 0
    capsys.readouterr()

    args = parser.parse_args(["inspect", str(tmp_path / "alpha.delta.safetensors")])
    assert args.func(args) == 0

    output = capsys.readouterr().out
    q_values = read_delta(tmp_path / "alpha.delta.safetensors").metadata.params["q_layers"]
    assert "per-layer q" in output
    q_line = next(line for line in output.splitlines() if line.startswith(Q_PROJ))
    assert q_line.split()[-1] == f"{q_values[Q_PROJ]:.4f}"

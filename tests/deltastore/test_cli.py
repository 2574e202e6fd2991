"""The offline subcommands, run in-process through the parser, and two through a real process."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from deltastore import cli
from deltastore.apply import apply, decode, model_params
from deltastore.checkpoint import FINGERPRINT_FILE
from deltastore.format import read_delta
from deltastore.methods import METHODS
from deltastore.qselect import Q_SELECTORS

REPOSITORY = Path(__file__).resolve().parents[2]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deltamux")
    cli.add_commands(parser.add_subparsers(dest="command"))
    return parser


def run(*argv: str) -> int:
    args = build_parser().parse_args([str(arg) for arg in argv])
    return args.func(args)


@pytest.fixture
def store(tmp_path) -> Path:
    return tmp_path / "store"


def compress_args(base: Path, finetuned: Path, store: Path, *extra: str) -> list[str]:
    return [
        "compress", "--base", base, "--finetuned", finetuned, "--task", "alpha", "--store", store,
        "--method", "dare", "--drop-rate", "0.9", *extra,
    ]


@pytest.fixture
def delta_file(tiny_base, tiny_finetunes, store) -> Path:
    assert run(*compress_args(tiny_base, tiny_finetunes["alpha"], store)) == 0
    return store / "alpha.delta.safetensors"


def assert_one_line_error(capsys, *fragments: str) -> None:
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    # Progress bars redraw with carriage returns; the error is the one line that names the command.
    errors = [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith("deltamux ")]
    assert len(errors) == 1, stderr
    for fragment in fragments:
        assert fragment in errors[0]


def test_parser_choices_match_registries():
    assert set(cli.METHOD_NAMES) == set(METHODS)
    assert set(cli.Q_SELECTOR_NAMES) == set(Q_SELECTORS)


def test_every_command_registered():
    parser = build_parser()
    for command in ("compress", "inspect", "verify", "reconstruct", "evaluate"):
        args = parser.parse_args(_minimal(command))
        assert callable(args.func)


def _minimal(command: str) -> list[str]:
    return {
        "compress": ["compress", "--base", "b", "--finetuned", "f", "--task", "t", "--store", "s", "--method", "dare", "--drop-rate", "0.5"],
        "inspect": ["inspect", "file"],
        "verify": ["verify", "file", "--base", "b"],
        "reconstruct": ["reconstruct", "file", "--base", "b", "--out", "o"],
        "evaluate": ["evaluate", "file", "--base", "b", "--finetuned", "f"],
    }[command]


def test_compress_help_names_units_and_defaults(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["compress", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "drop rate: the fraction of delta entries set to zero, in [0, 1)" in text
    assert "density" not in text
    assert "(default: 0)" in text
    assert "(default: exact)" in text
    assert "(default: float16)" in text


def test_compress_prints_summary(tiny_base, tiny_finetunes, store, capsys):
    assert run(*compress_args(tiny_base, tiny_finetunes["alpha"], store, "--seed", "3")) == 0
    output = capsys.readouterr().out
    assert "alpha.delta.safetensors" in output
    assert "drop rate 0.9" in output
    assert "of the bf16 checkpoint" in output
    assert read_delta(store / "alpha.delta.safetensors").metadata.params["seed"] == 3


def test_compress_prints_q_trace(tiny_base, tiny_finetunes, store, tmp_path, capsys):
    calibration = tmp_path / "calibration.txt"
    calibration.write_text("The quick brown fox jumps over the lazy dog.\n")
    argv = compress_args(tiny_base, tiny_finetunes["alpha"], store, "--q-select", "output-change", "--calibration", calibration)
    argv[argv.index("dare")] = "darex-q"
    assert run(*argv) == 0
    output = capsys.readouterr().out
    assert "q search (output-change, top-5 logit MSE)" in output
    assert "<- chosen" in output


def test_inspect_table(delta_file, tiny_base, capsys):
    assert run("inspect", delta_file) == 0
    output = capsys.readouterr().out
    metadata = read_delta(delta_file).metadata
    for label in ("method", "drop rate", "q", "seed", "nnz", "bytes", "ratio to bf16", "base fingerprint"):
        assert label in output
    assert metadata.base_fingerprint in output
    assert str(metadata.nnz) in output
    assert "model.layers.0.self_attn.q_proj.weight" in output


def test_inspect_json_ratio(delta_file, capsys):
    assert run("inspect", delta_file, "--json") == 0
    record = json.loads(capsys.readouterr().out)
    assert record["method"] == "dare"
    assert record["params"]["drop_rate"] == 0.9
    assert record["bf16_nbytes"] == 2 * record["extra"]["base_numel"]
    assert record["ratio_to_bf16"] == pytest.approx(record["nbytes"] / record["bf16_nbytes"])
    assert 0 < record["ratio_to_bf16"] < 0.5


def test_verify_accepts_intact_file(delta_file, tiny_base, capsys):
    assert run("verify", delta_file, "--base", tiny_base) == 0
    assert "OK" in capsys.readouterr().out


def test_verify_rejects_altered_file(delta_file, tiny_base, tmp_path, capsys):
    altered = tmp_path / "altered.delta.safetensors"
    data = bytearray(delta_file.read_bytes())
    data[-3] ^= 0x40  # one bit of the last stored value
    altered.write_bytes(bytes(data))
    assert run("verify", altered, "--base", tiny_base) == cli.EXIT_VERIFY_FAILED
    assert_one_line_error(capsys, "FAILED", "checksum")


def test_verify_rejects_other_base(delta_file, tiny_finetunes, capsys):
    assert run("verify", delta_file, "--base", tiny_finetunes["beta"]) == cli.EXIT_VERIFY_FAILED
    assert_one_line_error(capsys, "FAILED", "made for base")


def test_verify_rejects_truncated_file(delta_file, tiny_base, tmp_path, capsys):
    truncated = tmp_path / "truncated.delta.safetensors"
    truncated.write_bytes(delta_file.read_bytes()[:-100])
    assert run("verify", truncated, "--base", tiny_base) == cli.EXIT_VERIFY_FAILED
    assert_one_line_error(capsys, "FAILED")


def test_verify_missing_file(tiny_base, tmp_path, capsys):
    assert run("verify", tmp_path / "absent.delta.safetensors", "--base", tiny_base) == cli.EXIT_INVALID_INPUT
    assert_one_line_error(capsys, "not found")


def test_reconstruct_equals_applied_delta(delta_file, tiny_base, tmp_path):
    out = tmp_path / "reconstructed"
    assert run("reconstruct", delta_file, "--base", tiny_base, "--out", out) == 0
    assert (out / "config.json").exists()
    assert (out / "tokenizer.json").exists()
    assert not (out / FINGERPRINT_FILE).exists()

    reconstructed = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, local_files_only=True)
    applied = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32, local_files_only=True)
    apply(model_params(applied), decode(read_delta(delta_file)))

    for name, tensor in model_params(applied).items():
        assert torch.equal(model_params(reconstructed)[name], tensor), name
    input_ids = torch.tensor([[3, 17, 42, 99, 5, 250, 7]])
    with torch.no_grad():
        assert torch.equal(reconstructed(input_ids=input_ids).logits, applied(input_ids=input_ids).logits)
        base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32, local_files_only=True)
        assert not torch.equal(base(input_ids=input_ids).logits, applied(input_ids=input_ids).logits)


def test_reconstruct_bfloat16_base(tiny_base, tiny_finetunes, tmp_path):
    def to_bfloat16(source: Path, target: Path) -> Path:
        shutil.copytree(source, target)
        (target / FINGERPRINT_FILE).unlink(missing_ok=True)
        tensors = {name: tensor.to(torch.bfloat16) for name, tensor in load_file(target / "model.safetensors").items()}
        save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
        return target

    base = to_bfloat16(tiny_base, tmp_path / "base-bf16")
    finetuned = to_bfloat16(tiny_finetunes["beta"], tmp_path / "beta-bf16")
    assert run(*compress_args(base, finetuned, tmp_path / "store")) == 0
    delta_path = tmp_path / "store" / "alpha.delta.safetensors"
    out = tmp_path / "reconstructed"
    assert run("reconstruct", delta_path, "--base", base, "--out", out) == 0

    written = load_file(out / "model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, local_files_only=True)
    params = model_params(model)
    apply(params, decode(read_delta(delta_path)))
    for name, tensor in written.items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, params[name]), name


def test_reconstruct_rejects_nonempty_output(delta_file, tiny_base, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert run("reconstruct", delta_file, "--base", tiny_base, "--out", out) == cli.EXIT_INVALID_INPUT
    assert_one_line_error(capsys, "already exists")
    assert sorted(path.name for path in out.iterdir()) == ["keep.txt"]


def test_reconstruct_rejects_other_base(delta_file, tiny_finetunes, tmp_path, capsys):
    out = tmp_path / "out"
    assert run("reconstruct", delta_file, "--base", tiny_finetunes["beta"], "--out", out) == cli.EXIT_INVALID_INPUT
    assert_one_line_error(capsys, "made for base")
    assert not out.exists()
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".out")]


def test_evaluate_reports_both_measures(delta_file, tiny_base, tiny_finetunes, tmp_path, capsys):
    calibration = tmp_path / "calibration.txt"
    calibration.write_text("The quick brown fox jumps over the lazy dog.\nWhat is two plus two? The answer is four.\n")
    validation = tmp_path / "validation.jsonl"
    validation.write_text(json.dumps({"prompt": "The quick brown fox", "completion": " jumps"}) + "\n")
    argv = ["evaluate", delta_file, "--base", tiny_base, "--finetuned", tiny_finetunes["alpha"]]
    assert run(*argv, "--calibration", calibration, "--validation", validation, "--json") == 0
    record = json.loads(capsys.readouterr().out)
    assert record["task"] == "alpha"
    assert record["windows"] == 2
    assert record["output_change_pruned"] > 0
    assert record["output_change_base"] > 0
    for key in ("score_base", "score_finetuned", "score_pruned"):
        assert record[key]["total"] == 1


def test_evaluate_needs_an_input(delta_file, tiny_base, tiny_finetunes, capsys):
    argv = ["evaluate", delta_file, "--base", tiny_base, "--finetuned", tiny_finetunes["alpha"]]
    assert run(*argv) == cli.EXIT_INVALID_INPUT
    assert_one_line_error(capsys, "calibration")


@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        (["--drop-rate", "1.0"], ["drop rate 1.0", "[0, 1)"]),
        (["--drop-rate", "-0.2"], ["drop rate -0.2"]),
    ],
)
def test_compress_invalid_drop_rate(tiny_base, tiny_finetunes, store, capsys, extra, fragments):
    argv = compress_args(tiny_base, tiny_finetunes["alpha"], store)
    argv[argv.index("--drop-rate") + 1] = extra[1]
    assert run(*argv) == cli.EXIT_INVALID_INPUT
    assert_one_line_error(capsys, *fragments)
    assert not store.exists()


def test_compress_q_out_of_range(tiny_base, tiny_finetunes, store, capsys):
    argv = compress_args(tiny_base, tiny_finetunes["alpha"], store, "--q", "0.05")
    argv[argv.index("dare")] = "darex-q"
    assert run(*argv) == cli.EXIT_INVALID_INPUT
    assert_one_line_error(capsys, "q 0.05", "[0.1, 1]")


def test_compress_missing_base(tiny_finetunes, store, tmp_path, capsys):
    assert run(*compress_args(tmp_path / "absent", tiny_finetunes["alpha"], store)) == cli.EXIT_INVALID_INPUT
    assert_one_line_error(capsys, "absent", "does not exist")


def test_compress_missing_calibration(tiny_base, tiny_finetunes, store, tmp_path, capsys):
    argv = compress_args(tiny_base, tiny_finetunes["alpha"], store, "--calibration", tmp_path / "absent.txt")
    argv[argv.index("dare")] = "wanda"
    assert run(*argv) == cli.EXIT_INVALID_INPUT
    assert_one_line_error(capsys, "absent.txt", "does not exist")


def test_compress_empty_validation(tiny_base, tiny_finetunes, store, tmp_path, capsys):
    validation = tmp_path / "validation.jsonl"
    validation.write_text("\n")
    argv = compress_args(tiny_base, tiny_finetunes["alpha"], store, "--q-select", "validation", "--validation", validation)
    argv[argv.index("dare")] = "darex-q"
    assert run(*argv) == cli.EXIT_INVALID_INPUT
    assert_one_line_error(capsys, "validation.jsonl", "empty")


def test_compress_nan_finetune(tiny_base, tiny_finetunes, store, tmp_path, capsys):
    finetuned = tmp_path / "nan"
    shutil.copytree(tiny_finetunes["alpha"], finetuned)
    tensors = load_file(finetuned / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(tensors, finetuned / "model.safetensors", metadata={"format": "pt"})
    assert run(*compress_args(tiny_base, finetuned, store)) == cli.EXIT_INVALID_INPUT
    assert_one_line_error(capsys, "model.layers.1.mlp.up_proj.weight", "contains 1 NaN or infinite value;")
    assert not store.exists()


def test_inspect_not_a_delta(tiny_base, capsys):
    assert run("inspect", tiny_base / "model.safetensors") == cli.EXIT_INVALID_INPUT
    assert_one_line_error(capsys, "not a deltamux delta")


def test_entry_point_compress_and_verify(tiny_base, tiny_finetunes, tmp_path):
    store = tmp_path / "store"
    command = [sys.executable, "-m", "server.cli", "--log-level", "WARNING"]
    compressed = subprocess.run(
        command + [str(arg) for arg in compress_args(tiny_base, tiny_finetunes["beta"], store)],
        cwd=REPOSITORY, capture_output=True, text=True, timeout=300,
    )
    assert compressed.returncode == 0, compressed.stderr
    verified = subprocess.run(
        command + ["verify", str(store / "alpha.delta.safetensors"), "--base", str(tiny_base)],
        cwd=REPOSITORY, capture_output=True, text=True, timeout=300,
    )
    assert verified.returncode == 0, verified.stderr
    assert "OK" in verified.stdout


def test_entry_point_error_exit_code(tiny_base, tmp_path):
    command = [sys.executable, "-m", "server.cli", "--log-level", "WARNING"]
    argv = compress_args(tiny_base, tmp_path / "absent", tmp_path / "store")
    result = subprocess.run(command + [str(arg) for arg in argv], cwd=REPOSITORY, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "does not exist" in result.stderr


def test_compress_rows_int8_then_inspect(tiny_base, tiny_finetunes, store, capsys):
    assert run(*compress_args(tiny_base, tiny_finetunes["alpha"], store, "--structure", "rows", "--value-dtype", "int8")) == 0
    capsys.readouterr()

    assert run("inspect", store / "alpha.delta.safetensors") == 0

    output = capsys.readouterr().out
    assert "structure         rows" in output
    q_line = next(line for line in output.splitlines() if line.startswith("model.layers.0.self_attn.q_proj.weight"))
    assert q_line.split()[1:2] == ["rows"]
    assert "int8" in q_line


def test_compress_without_drop_rate_is_one_line_error(tiny_base, tiny_finetunes, store, capsys):
    argv = ["compress", "--base", tiny_base, "--finetuned", tiny_finetunes["alpha"], "--task", "alpha", "--store", store,
            "--method", "magnitude"]
    assert run(*argv) == 2
    assert_one_line_error(capsys, "needs a drop rate", "auto")


def test_verify_checks_every_file(delta_file, tiny_base, tmp_path, capsys):
    altered = tmp_path / "altered.delta.safetensors"
    data = bytearray(delta_file.read_bytes())
    data[-3] ^= 0xFF
    altered.write_bytes(bytes(data))

    assert run("verify", delta_file, altered, delta_file, "--base", tiny_base) == cli.EXIT_VERIFY_FAILED

    out, err = capsys.readouterr()
    assert out.count(": OK (") == 2
    assert err.count("FAILED") == 1

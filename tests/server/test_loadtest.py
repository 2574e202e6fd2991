"""`deltamux loadtest` against the tiny-model server on 127.0.0.1: runs, counts, reports, errors."""

from __future__ import annotations

import csv
import json
import random
import shutil
import socket
from collections import Counter
from pathlib import Path

import pytest

from server.cli import main
from server.loadtest.mix import MixSpecError, parse_mix
from server.loadtest.prompts import PromptFileError, load_prompts
from server.loadtest.runner import poisson_offsets
from server.settings import Settings
from tests.server.conftest import BASE_ID
from tests.server.support import LiveServer, start_server


@pytest.fixture(scope="module")
def server(tiny_base, delta_files, tmp_path_factory) -> LiveServer:
    """A server of its own, so no other test's traffic lands between the metric scrapes."""
    store = tmp_path_factory.mktemp("loadtest-store")
    for task in ("alpha", "beta"):
        shutil.copy(delta_files[task], store / delta_files[task].name)
    settings = Settings(
        base=tiny_base, store=store, device="cpu", base_name=BASE_ID, max_batch_size=4, time_slice=0.05,
        max_tokens_default=8,
    )
    live = start_server(settings)
    yield live
    live.stop()


@pytest.fixture
def prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("What is two plus two?\nI love this phone\n\nTranslate: good morning\n", encoding="utf-8")
    return path


def _loadtest(url: str, out: Path, prompts: Path, *extra: str, tasks: str = "alpha,beta") -> int:
    return main([
        "--log-level", "WARNING", "loadtest", "--url", url, "--tasks", tasks, "--duration", "1.5",
        "--prompts", str(prompts), "--out", str(out), "--max-tokens", "5", "--no-progress", *extra,
    ])


def test_short_run_matches_server_metrics(server, prompts, tmp_path) -> None:
    out = tmp_path / "report"

    code = _loadtest(server.base_url, out, prompts, "--mix", "zipf:1.1", "--rate", "9", tasks=f"alpha,beta,{BASE_ID}")

    assert code == 0
    report = json.loads((out / "report.json").read_text())
    overall = report["summary"]["overall"]
    assert overall["requests"] > 3
    assert overall["ok"] == overall["requests"]
    assert overall["errors"] == {}
    assert overall["ttft"]["p50"] > 0
    assert overall["latency"]["p99"] >= overall["latency"]["p50"] >= overall["ttft"]["p50"]
    assert overall["tokens_per_s"] > 0
    # Every request the client counted is one 200 in the server's counters, per task.
    server_requests = report["server"]["requests"]
    for task in ("alpha", "beta", BASE_ID):
        assert server_requests.get(task, {}).get("200", 0) == report["summary"][task]["ok"]
    assert sum(report["server"]["completion_tokens"].values()) == overall["completion_tokens"]
    assert report["server"]["swaps"] >= 1


def test_report_files_parse(server, prompts, tmp_path) -> None:
    out = tmp_path / "report"

    assert _loadtest(server.base_url, out, prompts, "--concurrency", "3") == 0

    report = json.loads((out / "report.json").read_text())
    with (out / "requests.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    with (out / "summary.csv").open() as handle:
        summary = {row["group"]: row for row in csv.DictReader(handle)}
    assert len(rows) == report["summary"]["overall"]["requests"]
    assert {row["status"] for row in rows} == {"200"}
    assert set(summary) == {"overall", "alpha", "beta"}
    assert int(summary["overall"]["ok"]) == len(rows)
    assert float(summary["alpha"]["ttft_p90_s"]) > 0
    for name in ("latency_cdf.png", "timeline.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_task_counted_not_fatal(server, prompts, tmp_path) -> None:
    out = tmp_path / "report"

    code = _loadtest(server.base_url, out, prompts, "--rate", "8", "--no-plots", tasks="alpha,no-such-task")

    assert code == 0
    summary = json.loads((out / "report.json").read_text())["summary"]
    missing = summary["no-such-task"]
    assert missing["requests"] > 0
    assert missing["ok"] == 0
    assert missing["errors"] == {"404": missing["requests"]}
    assert summary["alpha"]["ok"] == summary["alpha"]["requests"] > 0
    assert summary["overall"]["errors"] == {"404": missing["requests"]}


def test_chat_prompts_from_jsonl(server, tmp_path) -> None:
    path = tmp_path / "prompts.jsonl"
    lines = [{"messages": [{"role": "user", "content": "Say hi"}]}, {"prompt": "Once upon a time"}]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n", encoding="utf-8")
    out = tmp_path / "report"

    assert _loadtest(server.base_url, out, path, "--concurrency", "2", "--no-plots", tasks="beta") == 0

    beta = json.loads((out / "report.json").read_text())["summary"]["beta"]
    assert beta["ok"] == beta["requests"] > 1


def test_zipf_draws_follow_skew() -> None:
    tasks = [f"t{i}" for i in range(7)]
    mix = parse_mix("zipf:1.1", tasks)
    rng = random.Random(1234)
    draws = 40_000

    counts = Counter(mix.draw(rng) for _ in range(draws))

    harmonic = sum(1 / k**1.1 for k in range(1, 8))
    for rank, task in enumerate(tasks, start=1):
        expected = (1 / rank**1.1) / harmonic
        # The standard error of a share is at most sqrt(0.25 / 40000) = 0.0025; 0.01 is 4 of them.
        assert abs(counts[task] / draws - expected) < 0.01, (task, counts[task] / draws, expected)
    assert [counts[t] for t in tasks] == sorted((counts[t] for t in tasks), reverse=True)


def test_zipf_zero_is_uniform() -> None:
    mix = parse_mix("zipf:0", ["a", "b", "c"])

    assert mix.weights == pytest.approx((1 / 3, 1 / 3, 1 / 3))


def test_poisson_offsets_mean_rate() -> None:
    offsets = poisson_offsets(20.0, 300.0, random.Random(7))

    # 6000 arrivals expected; the Poisson standard deviation is sqrt(6000), about 77.
    assert abs(len(offsets) - 6000) < 4 * 77
    assert offsets == sorted(offsets)
    assert offsets[0] >= 0
    assert offsets[-1] < 300.0


def test_trace_mix_replays_arrivals(server, prompts, tmp_path) -> None:
    trace = tmp_path / "trace.txt"
    trace.write_text("# seconds task\n0.0 alpha\n0.1,beta\n0.2 alpha\n0.3 alpha\n9.0 beta\n", encoding="utf-8")
    out = tmp_path / "report"

    assert _loadtest(server.base_url, out, prompts, "--mix", f"trace:{trace}", "--no-plots") == 0

    summary = json.loads((out / "report.json").read_text())["summary"]
    # The arrival at 9.0 s lies after --duration 1.5 and is not sent.
    assert (summary["alpha"]["requests"], summary["beta"]["requests"]) == (3, 1)


@pytest.mark.parametrize(
    ("spec", "message"),
    [("zipf", "needs an exponent"), ("zipf:x", "invalid Zipf exponent"), ("zipf:-1", "must be in"),
     ("pareto:2", "unknown mix"), ("uniform:3", "takes no argument"), ("trace:/no/such/file", "cannot read trace")],
)
def test_bad_mix_spec_rejected(spec, message) -> None:
    with pytest.raises(MixSpecError, match=message):
        parse_mix(spec, ["a", "b"])


def test_bad_prompt_lines_rejected(tmp_path) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "ok"}\n{"text": "no prompt key"}\n', encoding="utf-8")

    with pytest.raises(PromptFileError, match=":2: expected a non-empty 'prompt'"):
        load_prompts(path)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--mix", "zipf:abc", "--rate", "2"], "invalid Zipf exponent"),
        (["--rate", "0"], "invalid --rate"),
        (["--rate", "-3"], "invalid --rate"),
        ([], "exactly one of --rate"),
        (["--rate", "1", "--concurrency", "2"], "exactly one of --rate"),
        (["--rate", "1", "--prompts", "/no/such/prompts.txt"], "not found"),
    ],
)
def test_invalid_arguments_exit_2(prompts, tmp_path, capsys, extra, message) -> None:
    code = _loadtest("http://127.0.0.1:9", tmp_path / "out", prompts, *extra)

    assert code == 2
    error = capsys.readouterr().err.strip()
    assert message in error
    assert len(error.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_unreachable_url_exit_2(prompts, tmp_path, capsys) -> None:
    # A port bound here without listen() refuses connections, and no other process can take it meanwhile.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        code = _loadtest(url, tmp_path / "out", prompts, "--rate", "2")

    assert code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("deltamux loadtest: error: cannot reach the server")
    assert len(error.splitlines()) == 1


@pytest.fixture(scope="module")
def keyed_server(tiny_base, delta_files, tmp_path_factory) -> LiveServer:
    store = tmp_path_factory.mktemp("loadtest-keyed-store")
    shutil.copy(delta_files["alpha"], store / delta_files["alpha"].name)
    keys = [{"name": "bench", "key": "loadtest-key-0123456789", "tasks": "*", "admin": True}]
    settings = Settings(
        base=tiny_base, store=store, device="cpu", base_name=BASE_ID, max_tokens_default=8,
        api_keys=json.dumps(keys), metrics_require_key=True,
    )
    live = start_server(settings)
    yield live
    live.stop()


def test_api_key_sent_everywhere(keyed_server, prompts, tmp_path) -> None:
    out = tmp_path / "report"

    code = _loadtest(keyed_server.base_url, out, prompts, "--rate", "6", "--no-plots", "--api-key", "loadtest-key-0123456789",
                     tasks="alpha")

    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["alpha"]["ok"] == report["summary"]["alpha"]["requests"] > 0
    # /metrics needs the admin key here, so the server section exists only if the key went with the scrapes.
    assert report["server"]["requests"]["alpha"]["200"] == report["summary"]["alpha"]["ok"]


@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_rejected_api_key_exit_2(keyed_server, prompts, tmp_path, capsys, key) -> None:
    extra = ["--rate", "2"] + ([] if key is None else ["--api-key", key])

    code = _loadtest(keyed_server.base_url, tmp_path / "out", prompts, *extra, tasks="alpha")

    assert code == 2
    error = capsys.readouterr().err.strip()
    assert "rejected" in error
    assert "401" in error
    assert len(error.splitlines()) == 1

"""Compress real fine-tunes over a grid of methods and drop rates, score each on a task split.

The driver behind docs/results.md and the demo deltas. Every cell of the grid (task, optimizer,
variant, drop rate) runs `deltamux compress` as a subprocess, with the arguments its recorded
command shows. The driver then scores base + delta on a split of the task data and appends one
JSON line to the results file. A cell whose row is already in the file is skipped, so an interrupted run resumes
where it stopped, and `table` rebuilds the markdown tables from the file alone.

Scoring runs in this process on one loaded base: `apply` (mode exact, float32) writes base + delta
into the model, the task metric of `deltastore.realdata.evaluate` runs, and `restore` puts the
base back. That computes what `deltamux reconstruct` followed by `deltamux score-task` on the
written folder computes, without writing a 540 MB folder per cell. Each row records those two
commands as the equivalent.

    python benchmarks/results.py inputs --base /work/base1 --work /work/runs/results
    python benchmarks/results.py run --base /work/base1 --runs /work/runs --work /work/runs/results \
        --task sentiment --variant dare --variant magnitude --drop-rate 0.99 --split test --limit 100
    python benchmarks/results.py recommend --base /work/base1 --runs /work/runs --work /work/runs/results \
        --task sentiment --optimizer adamw --drop-rates 0.9,0.99,0.999
    python benchmarks/results.py table --results /work/runs/results/results.jsonl

`recommend` runs `deltamux recommend --json` on the same prepared inputs and appends its pick as a
row of variant `recommend`; `table` then compares that pick with the grid's cells at its drop rate.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import shutil
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

logger = logging.getLogger("benchmarks.results")

TASKS = ("sentiment", "arithmetic", "instruct")
OPTIMIZERS = ("adamw", "adamr")
# Calibration and validation budgets of the q searches and WANDA, small because the grid runs
# on a shared 2-core CPU; raise them on a larger machine.
CALIBRATION_EXAMPLES = 32
WINDOW_TOKENS = 128
MAX_WINDOWS = 8
SEARCH_VALIDATION_EXAMPLES = 20


@dataclass(frozen=True)
class Variant:
    """One compression recipe: a `deltamux compress` method and its extra options."""

    name: str
    method: str
    options: tuple[str, ...] = ()
    # Which prepared input files the options name: "calibration", "search-validation".
    inputs: tuple[str, ...] = ()


VARIANTS: dict[str, Variant] = {
    variant.name: variant
    for variant in (
        Variant(name="dare", method="dare"),
        Variant(
            name="darex-q-output-change", method="darex-q",
            options=("--q-select", "output-change"), inputs=("calibration",),
        ),
        Variant(
            name="darex-q-validation", method="darex-q",
            options=("--q-select", "validation", "--max-new-tokens", "16"), inputs=("search-validation",),
        ),
        Variant(name="magnitude", method="magnitude"),
        Variant(name="wanda", method="wanda", inputs=("calibration",)),
        # Ablations of per-layer q, row structure and int8 values, run at one drop rate.
        Variant(
            name="darex-q-per-layer", method="darex-q",
            options=("--q-select", "per-layer"), inputs=("calibration",),
        ),
        Variant(
            name="darex-q-output-change-int8", method="darex-q",
            options=("--q-select", "output-change", "--value-dtype", "int8"), inputs=("calibration",),
        ),
        Variant(
            name="darex-q-output-change-rows", method="darex-q",
            options=("--q-select", "output-change", "--structure", "rows"), inputs=("calibration",),
        ),
        Variant(name="dare-int8", method="dare", options=("--value-dtype", "int8")),
        Variant(name="dare-rows", method="dare", options=("--structure", "rows")),
        Variant(name="magnitude-int8", method="magnitude", options=("--value-dtype", "int8")),
        Variant(name="magnitude-rows", method="magnitude", options=("--structure", "rows")),
        # Magnitude and WANDA with DARE's 1 / (1 - p) rescale of the kept values.
        Variant(name="magnitude-rescale", method="magnitude", options=("--rescale",)),
        Variant(name="wanda-rescale", method="wanda", options=("--rescale",), inputs=("calibration",)),
    )
}

# Rows that score a whole model folder instead of a compressed delta.
REFERENCE_MODELS = ("base", "finetuned")

# The methods of the main grid, against which a recommendation is compared.
GRID_VARIANTS = ("dare", "darex-q-output-change", "darex-q-validation", "magnitude", "wanda")
# Rows of `deltamux recommend`: its pick and its own score, on validation or calibration data.
RECOMMEND_VARIANT = "recommend"
# The grid variant that runs each (method, q selector) the recommender can return.
RECOMMENDED_VARIANTS = {
    ("dare", None): "dare",
    ("darex-q", "validation"): "darex-q-validation",
    ("darex-q", "output-change"): "darex-q-output-change",
    ("magnitude", None): "magnitude",
    ("wanda", None): "wanda",
}


@dataclass
class Row:
    """One measured cell: what was compressed, how, and its score."""

    task: str
    optimizer: str | None
    variant: str
    drop_rate: float | None
    split: str
    limit: int | None
    metric: str
    value: float
    examples: int
    higher_is_better: bool
    commands: list[str]
    delta_path: str | None = None
    nnz: int | None = None
    nbytes: int | None = None
    q: float | None = None
    compress_seconds: float | None = None
    score_seconds: float | None = None
    params: dict = field(default_factory=dict)

    def key(self) -> tuple:
        return (self.task, self.optimizer, self.variant, self.drop_rate, self.split, self.limit)


def row_key(record: dict) -> tuple:
    return tuple(record.get(name) for name in ("task", "optimizer", "variant", "drop_rate", "split", "limit"))


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def append_row(path: Path, row: Row) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(asdict(row), sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------
# inputs: calibration text and the small validation file of the q search


def input_paths(work: Path, task: str) -> dict[str, Path]:
    return {
        "calibration": work / "inputs" / f"{task}-calibration.jsonl",
        "search-validation": work / "inputs" / f"{task}-validation-{SEARCH_VALIDATION_EXAMPLES}.jsonl",
    }


def prepare_inputs(*, base: Path, data_dir: Path, work: Path, tasks: list[str]) -> None:
    """Write, per task, calibration text from the train split and a rendered validation subset.

    Calibration lines are `{"text": prompt + reference reply}` rendered by the base's chat template,
    so the windows resemble the text the task's model reads. The validation subset contains the first
    SEARCH_VALIDATION_EXAMPLES validation examples with text prompts, the form the q search reads.
    """
    from transformers import AutoTokenizer

    from deltastore.realdata.encoding import render_completion, render_prompt
    from deltastore.realdata.tasks import load_examples

    tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
    for task in tasks:
        paths = input_paths(work, task)
        paths["calibration"].parent.mkdir(parents=True, exist_ok=True)

        train = load_examples(data_dir / task / "train.jsonl")[:CALIBRATION_EXAMPLES]
        lines = [
            json.dumps({"text": render_prompt(tokenizer, ex.prompt) + render_completion(tokenizer, ex)}, ensure_ascii=False)
            for ex in train
        ]
        paths["calibration"].write_text("\n".join(lines) + "\n", encoding="utf-8")

        validation = load_examples(data_dir / task / "validation.jsonl")[:SEARCH_VALIDATION_EXAMPLES]
        lines = []
        for ex in validation:
            record = {"prompt": render_prompt(tokenizer, ex.prompt), "completion": ex.completion}
            if ex.answer is not None:
                record["answer"] = ex.answer
            lines.append(json.dumps(record, ensure_ascii=False))
        paths["search-validation"].write_text("\n".join(lines) + "\n", encoding="utf-8")
        logger.info("inputs for %s: %s", task, ", ".join(str(p) for p in paths.values()))


# ---------------------------------------------------------------------------------------------
# compress


def deltamux_command() -> str:
    """Return the `deltamux` executable beside this interpreter, else the one on PATH."""
    beside = Path(sys.executable).with_name("deltamux")
    if beside.is_file():
        return str(beside)
    found = shutil.which("deltamux")
    if found is None:
        raise FileNotFoundError("deltamux executable not found beside the interpreter or on PATH; install the package with `pip install -e .`")
    return found


def compress_command(
    *, base: Path, finetuned: Path, task: str, store: Path, variant: Variant, drop_rate: float, work: Path
) -> list[str]:
    command = [
        "deltamux", "compress", "--base", str(base), "--finetuned", str(finetuned), "--task", task,
        "--store", str(store), "--method", variant.method, "--drop-rate", f"{drop_rate:g}",
        *variant.options,
    ]
    paths = input_paths(work, task)
    if "calibration" in variant.inputs:
        command += ["--calibration", str(paths["calibration"])]
        command += ["--window-tokens", str(WINDOW_TOKENS), "--max-windows", str(MAX_WINDOWS)]
    if "search-validation" in variant.inputs:
        command += ["--validation", str(paths["search-validation"])]
    return command


def cell_store(work: Path, *, optimizer: str, variant: str, drop_rate: float) -> Path:
    return work / "deltas" / f"{optimizer}-{variant}-p{drop_rate:g}"


def run_compress(command: list[str], *, log_path: Path) -> float:
    """Run one compress command with its output appended to `log_path`; return its seconds."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with log_path.open("a", encoding="utf-8") as log:
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        completed = subprocess.run([deltamux_command(), *command[1:]], stdout=log, stderr=subprocess.STDOUT, check=False)
    seconds = time.perf_counter() - started
    if completed.returncode != 0:
        raise RuntimeError(f"compress failed with exit code {completed.returncode}; see {log_path}")
    return seconds


# ---------------------------------------------------------------------------------------------
# scoring in process


class Scorer:
    """One base model kept loaded; scores a model folder or base + a delta file on a task split."""

    def __init__(self, *, base: Path, data_dir: Path, batch_size: int) -> None:
        self.base = base
        self.data_dir = data_dir
        self.batch_size = batch_size
        self._model = None
        self._tokenizer = None

    def _load(self, folder: Path):  # noqa: ANN202
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        # float32, as score-task loads models, so scores do not depend on half-precision kernels.
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()
        return model, tokenizer

    def base_model(self):  # noqa: ANN201
        if self._model is None:
            self._model, self._tokenizer = self._load(self.base)
        return self._model, self._tokenizer

    def score(self, model, tokenizer, *, task: str, split: str, limit: int | None) -> tuple[str, float, int, bool]:  # noqa: ANN001
        from deltastore.realdata.evaluate import METRICS, generate_replies, mean_nll
        from deltastore.realdata.tasks import get_task, load_examples

        metric = METRICS[get_task(task).metric]
        examples = load_examples(self.data_dir / task / f"{split}.jsonl")
        if limit is not None:
            examples = examples[:limit]
        if metric.extract is None:
            value = mean_nll(model, tokenizer, examples, batch_size=self.batch_size, max_length=512)
        else:
            replies = generate_replies(model, tokenizer, examples, max_new_tokens=metric.max_new_tokens, batch_size=self.batch_size)
            hits = [metric.extract(reply) == ex.answer for reply, ex in zip(replies, examples, strict=True)]
            value = sum(hits) / len(hits)
        return metric.name, value, len(examples), metric.higher_is_better

    def score_folder(self, folder: Path, *, task: str, split: str, limit: int | None) -> tuple[str, float, int, bool]:
        if folder == self.base:
            model, tokenizer = self.base_model()
            return self.score(model, tokenizer, task=task, split=split, limit=limit)
        model, tokenizer = self._load(folder)
        try:
            return self.score(model, tokenizer, task=task, split=split, limit=limit)
        finally:
            del model

    def score_delta(self, delta_path: Path, *, task: str, split: str, limit: int | None) -> tuple[str, float, int, bool]:
        from deltastore.apply import apply, decode, model_params, restore
        from deltastore.checkpoint import fingerprint
        from deltastore.format import read_delta

        model, tokenizer = self.base_model()
        delta = read_delta(delta_path, expected_fingerprint=fingerprint(self.base))
        params = model_params(model)
        applied = apply(params, decode(delta, device="cpu"), mode="exact")
        try:
            return self.score(model, tokenizer, task=task, split=split, limit=limit)
        finally:
            restore(params, applied)


def score_commands(*, model: str, task: str, split: str, limit: int | None, delta: Path | None, base: Path) -> list[str]:
    """Return the CLI commands that compute the same score as the in-process scorer."""
    limit_args = [] if limit is None else ["--limit", str(limit)]
    commands = []
    if delta is not None:
        commands.append(shlex.join(["deltamux", "reconstruct", "--base", str(base), "--out", model, str(delta)]))
    commands.append(shlex.join(["deltamux", "score-task", "--model", model, "--task", task, "--split", split, *limit_args]))
    return commands


# ---------------------------------------------------------------------------------------------
# the grid


@dataclass(frozen=True)
class GridSettings:
    """Input folders, the results file and the cells to run, in order."""

    base: Path
    runs: Path
    data_dir: Path
    work: Path
    results: Path
    tasks: list[str]
    optimizers: list[str]
    variants: list[str]
    drop_rates: list[float]
    split: str
    limit: int | None
    references: bool
    batch_size: int
    # No cell starts at or after this time; a cell already running finishes.
    start_before: datetime | None = None


def finetune_folder(runs: Path, task: str, optimizer: str) -> Path | None:
    """Return the finished fine-tune `RUNS/<task>-<optimizer>`, or None while it is missing or running."""
    folder = runs / f"{task}-{optimizer}"
    if not (folder / "model.safetensors").is_file() or not (folder / "finetune.json").is_file():
        return None
    return folder


def run_grid(settings: GridSettings) -> None:
    done = {row_key(record) for record in read_rows(settings.results)}
    scorer = Scorer(base=settings.base, data_dir=settings.data_dir, batch_size=settings.batch_size)

    # 1. Reference rows: the base, and each finished fine-tune, on the same examples.
    if settings.references:
        for task in settings.tasks:
            references = [("base", None, settings.base)]
            for optimizer in settings.optimizers:
                folder = finetune_folder(settings.runs, task, optimizer)
                if folder is not None:
                    references.append(("finetuned", optimizer, folder))
            for variant, optimizer, folder in references:
                key = (task, optimizer, variant, None, settings.split, settings.limit)
                if key in done:
                    continue
                started = time.perf_counter()
                metric, value, examples, higher = scorer.score_folder(folder, task=task, split=settings.split, limit=settings.limit)
                row = Row(
                    task=task, optimizer=optimizer, variant=variant, drop_rate=None, split=settings.split,
                    limit=settings.limit, metric=metric, value=value, examples=examples, higher_is_better=higher,
                    commands=score_commands(model=str(folder), task=task, split=settings.split, limit=settings.limit, delta=None, base=settings.base),
                    score_seconds=time.perf_counter() - started,
                )
                append_row(settings.results, row)
                done.add(row.key())
                logger.info("%s %s %s: %s = %.4f", task, optimizer or "-", variant, metric, value)

    # 2. Compressed cells, in the order given: drop rate first, so a partial run covers every
    # method at the most informative drop rate.
    for drop_rate in settings.drop_rates:
        for task in settings.tasks:
            for optimizer in settings.optimizers:
                folder = finetune_folder(settings.runs, task, optimizer)
                if folder is None:
                    logger.info("skipping %s-%s: no finished fine-tune under %s", task, optimizer, settings.runs)
                    continue
                for name in settings.variants:
                    key = (task, optimizer, name, drop_rate, settings.split, settings.limit)
                    if key in done:
                        continue
                    if settings.start_before is not None and datetime.now(timezone.utc) >= settings.start_before:
                        logger.info("not starting %s %s %s p=%g: past --start-before %s", task, optimizer, name, drop_rate, settings.start_before.isoformat())
                        return
                    run_cell(settings, scorer, task=task, optimizer=optimizer, folder=folder, variant=VARIANTS[name], drop_rate=drop_rate)
                    done.add(key)


def run_cell(settings: GridSettings, scorer: Scorer, *, task: str, optimizer: str, folder: Path, variant: Variant, drop_rate: float) -> None:
    """Compress one cell (unless its delta exists), score it and append its row; log a failure as a row."""
    from deltastore.format import delta_file_name, read_metadata

    store = cell_store(settings.work, optimizer=optimizer, variant=variant.name, drop_rate=drop_rate)
    delta_path = store / delta_file_name(task)
    command = compress_command(
        base=settings.base, finetuned=folder, task=task, store=store, variant=variant, drop_rate=drop_rate, work=settings.work,
    )
    commands = [shlex.join(command)]
    model_out = f"/tmp/{task}-{optimizer}-{variant.name}-p{drop_rate:g}"
    commands += score_commands(model=model_out, task=task, split=settings.split, limit=settings.limit, delta=delta_path, base=settings.base)
    row_base = dict(task=task, optimizer=optimizer, variant=variant.name, drop_rate=drop_rate, split=settings.split, limit=settings.limit, commands=commands)

    # 1. Compress, or reuse the delta an earlier run of the same command wrote.
    compress_seconds = None
    if not delta_path.is_file():
        try:
            compress_seconds = run_compress(command, log_path=settings.work / "logs" / f"{task}.log")
        except RuntimeError as e:
            logger.error("%s %s %s p=%g: %s", task, optimizer, variant.name, drop_rate, e)
            append_row(settings.results, Row(**row_base, metric="failed", value=float("nan"), examples=0, higher_is_better=True, params={"error": str(e)}))
            return
    metadata = read_metadata(delta_path)

    # 2. Score base + delta.
    started = time.perf_counter()
    metric, value, examples, higher = scorer.score_delta(delta_path, task=task, split=settings.split, limit=settings.limit)
    params = dict(metadata.params)
    # Per-layer q values are one per tensor; the delta file keeps them, the row keeps eta.
    params.pop("q_layers", None)
    q = metadata.params.get("q")
    row = Row(
        **row_base, metric=metric, value=value, examples=examples, higher_is_better=higher,
        delta_path=str(delta_path), nnz=metadata.nnz, nbytes=metadata.nbytes, q=q,
        compress_seconds=compress_seconds, score_seconds=time.perf_counter() - started, params=params,
    )
    append_row(settings.results, row)
    logger.info("%s %s %s p=%g: %s = %.4f (nnz %d, %d bytes, q %s)", task, optimizer, variant.name, drop_rate, metric, value, metadata.nnz, metadata.nbytes, q)


# ---------------------------------------------------------------------------------------------
# recommend: the recommender's pick, recorded as a row


def labelled_task(task: str) -> bool:
    """Return whether a task is scored on a short answer, so a validation file can score it."""
    from deltastore.realdata.evaluate import METRICS
    from deltastore.realdata.tasks import get_task

    return METRICS[get_task(task).metric].extract is not None


def recommend_command(*, base: Path, finetuned: Path, task: str, work: Path, drop_rates: str) -> list[str]:
    """Build the `deltamux recommend` command of one fine-tune with the grid's inputs and budgets.

    Calibration text is always passed because WANDA needs it. The validation subset is passed only
    for tasks scored on a short answer: given one, the recommender scores exact match, which does
    not measure a task like instruct. Without it, the recommender scores the top-5 logit MSE on
    the calibration text.
    """
    paths = input_paths(work, task)
    command = [
        "deltamux", "recommend", "--base", str(base), "--finetuned", str(finetuned),
        "--calibration", str(paths["calibration"]),
        "--window-tokens", str(WINDOW_TOKENS), "--max-windows", str(MAX_WINDOWS),
        "--drop-rates", drop_rates,
    ]
    if labelled_task(task):
        command += ["--validation", str(paths["search-validation"]), "--max-new-tokens", "16"]
    return command + ["--json"]


def recommendation_row(recommendation: dict, *, task: str, optimizer: str, command: list[str], seconds: float) -> Row:
    """Turn the JSON of `deltamux recommend` into a row: its pick, size and own score."""
    chosen = next(
        (
            c for c in recommendation["candidates"]
            if c["method"] == recommendation["method"] and c["drop_rate"] == recommendation["drop_rate"]
        ),
        None,
    )
    labelled = "--validation" in command
    stats = recommendation["stats"]
    params = {
        "method": recommendation["method"],
        "q_select": recommendation["q_select"],
        "expected_quality": recommendation["expected_quality"],
        "reasons": recommendation["reasons"],
        "candidates": recommendation["candidates"],
        "mean_abs": stats["mean_abs"],
        "large": stats["large"],
        "recommend_seconds": seconds,
    }
    return Row(
        task=task, optimizer=optimizer, variant=RECOMMEND_VARIANT, drop_rate=recommendation["drop_rate"],
        # The search data: the validation subset, or the calibration text made from train examples.
        split="validation" if labelled else "train",
        limit=SEARCH_VALIDATION_EXAMPLES if labelled else CALIBRATION_EXAMPLES,
        metric=recommendation["metric"] or "none",
        value=float("nan") if chosen is None else chosen["score"],
        examples=SEARCH_VALIDATION_EXAMPLES if labelled else CALIBRATION_EXAMPLES,
        higher_is_better=labelled,
        commands=[shlex.join(command)],
        nbytes=recommendation["expected_nbytes"],
        q=None if chosen is None else chosen["q"],
        params=params,
    )


def run_recommendations(
    *, base: Path, runs: Path, work: Path, results: Path, tasks: list[str], optimizers: list[str], drop_rates: str, threads: int
) -> None:
    """Run `deltamux recommend` per finished fine-tune that has no recommend row yet; append a row each."""
    done = {(r["task"], r["optimizer"]) for r in read_rows(results) if r["variant"] == RECOMMEND_VARIANT}
    for task in tasks:
        for optimizer in optimizers:
            folder = finetune_folder(runs, task, optimizer)
            if folder is None or (task, optimizer) in done:
                continue
            command = recommend_command(base=base, finetuned=folder, task=task, work=work, drop_rates=drop_rates)
            log_path = work / "logs" / f"{task}.log"
            log_path.parent.mkdir(parents=True, exist_ok=True)
            started = time.perf_counter()
            with log_path.open("a", encoding="utf-8") as log:
                log.write(f"$ {shlex.join(command)}\n")
                log.flush()
                completed = subprocess.run(
                    [deltamux_command(), *command[1:]], stdout=subprocess.PIPE, stderr=log, text=True, check=False,
                    env={**os.environ, "OMP_NUM_THREADS": str(threads)},
                )
                log.write(completed.stdout)
            seconds = time.perf_counter() - started
            if completed.returncode != 0:
                error = f"recommend failed with exit code {completed.returncode}; see {log_path}"
                logger.error("%s %s: %s", task, optimizer, error)
                append_row(results, Row(
                    task=task, optimizer=optimizer, variant=RECOMMEND_VARIANT, drop_rate=None, split="validation",
                    limit=None, metric="failed", value=float("nan"), examples=0, higher_is_better=True,
                    commands=[shlex.join(command)], params={"error": error, "recommend_seconds": seconds},
                ))
                continue
            row = recommendation_row(json.loads(completed.stdout), task=task, optimizer=optimizer, command=command, seconds=seconds)
            append_row(results, row)
            logger.info("%s %s recommend: %s at p=%g (%s), %.0f s", task, optimizer, row.params["method"], row.drop_rate, row.params["expected_quality"], seconds)


# ---------------------------------------------------------------------------------------------
# tables


def format_value(record: dict) -> str:
    if record["metric"] in ("failed", "not run"):
        return record["metric"]
    return f"{record['value']:.3f}"


def format_q(record: dict) -> str:
    """Return the rescale q of a row: stored for darex-q, 1 - p for DARE and --rescale, '-' without a rescale."""
    if record["metric"] == "not run":
        return ""
    if record.get("q") is not None:
        return f"{record['q']:.4g}"
    variant = VARIANTS.get(record["variant"])
    method = variant.method if variant is not None else None
    rescaled = method == "dare" or (variant is not None and "--rescale" in variant.options)
    if rescaled and record.get("drop_rate") is not None:
        return f"{1 - record['drop_rate']:.4g}"
    if method == "darex-q" and record.get("params", {}).get("eta") is not None:
        return f"per layer, eta {record['params']['eta']:g}"
    return "-" if method is not None else ""


def latest_rows(records: list[dict], *, task: str, split: str) -> list[dict]:
    """Return one task's rows on one split, the last row of each cell winning, in table order."""
    latest: dict[tuple, dict] = {}
    for record in records:
        if record["task"] == task and record["split"] == split and record["variant"] != RECOMMEND_VARIANT:
            latest[row_key(record)] = record
    return sorted(latest.values(), key=table_order)


def best_grid_rows(records: list[dict], *, task: str, optimizer: str, drop_rate: float, split: str) -> list[dict]:
    """Return the grid rows with the best score of one fine-tune at one drop rate (several on a tie)."""
    rows = [
        r for r in latest_rows(records, task=task, split=split)
        if r["optimizer"] == optimizer and r["drop_rate"] == drop_rate and r["variant"] in GRID_VARIANTS
        and r["metric"] not in ("failed", "not run")
    ]
    if not rows:
        return []
    pick = max if rows[0]["higher_is_better"] else min
    best = pick(r["value"] for r in rows)
    return [r for r in rows if r["value"] == best]


def render_recommendations(records: list[dict], *, split: str, tasks: list[str]) -> str:
    """Render each recorded recommendation beside the grid's scores at its drop rate on `split`.

    The recommender scores its pick on its own search data: the validation subset, or calibration
    text. The grid columns are test scores of the same fine-tune, so the two quality columns differ
    in data and, for calibration text, in metric.
    """
    latest: dict[tuple, dict] = {}
    for record in records:
        if record["variant"] == RECOMMEND_VARIANT and record["task"] in tasks:
            latest[(record["task"], record["optimizer"])] = record
    if not latest:
        return ""
    lines = [
        "| # | task | optimizer | recommended | drop rate | expected MB | expected quality (search data) "
        "| grid score of the pick | best in grid at that drop rate | fine-tune |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    commands = []
    ordered = sorted(latest.values(), key=lambda r: (tasks.index(r["task"]), OPTIMIZERS.index(r["optimizer"])))
    for number, r in enumerate(ordered, start=1):
        commands.append(f"# {number}\n" + "\n".join(r["commands"]))
        if r["metric"] == "failed":
            lines.append(f"| {number} | {r['task']} | {r['optimizer']} | failed | | | {r['params'].get('error', '')} | | | |")
            continue
        params = r["params"]
        method = params["method"] + (f" ({params['q_select']} q)" if params.get("q_select") else "")
        variant = RECOMMENDED_VARIANTS.get((params["method"], params.get("q_select")))
        grid = {(g["variant"], g["drop_rate"]): g for g in latest_rows(records, task=r["task"], split=split) if g["optimizer"] == r["optimizer"]}
        picked = grid.get((variant, r["drop_rate"]))
        picked_text = "not run" if picked is None else format_value(picked)
        best = best_grid_rows(records, task=r["task"], optimizer=r["optimizer"], drop_rate=r["drop_rate"], split=split)
        best_text = "not run" if not best else ", ".join(g["variant"] for g in best) + f": {format_value(best[0])}"
        finetuned = grid.get(("finetuned", None))
        finetuned_text = "" if finetuned is None else format_value(finetuned)
        size = "" if r.get("nbytes") is None else f"{r['nbytes'] / 1e6:.2f}"
        lines.append(
            f"| {number} | {r['task']} | {r['optimizer']} | {method} | {r['drop_rate']:g} | {size} "
            f"| {params['expected_quality']} | {picked_text} | {best_text} | {finetuned_text} |"
        )
    return "\n".join(lines) + "\n\n```\n" + "\n".join(commands) + "\n```"


def table_order(record: dict) -> tuple:
    """Sort key: the base, then per optimizer the fine-tune and its cells by drop rate and variant."""
    variants = {name: index for index, name in enumerate((*REFERENCE_MODELS, *VARIANTS))}
    optimizers = {name: index for index, name in enumerate(OPTIMIZERS)}
    optimizer = -1 if record["optimizer"] is None else optimizers.get(record["optimizer"], len(OPTIMIZERS))
    return (optimizer, record["drop_rate"] or 0.0, variants.get(record["variant"], len(variants)))


@dataclass(frozen=True)
class ExpectedGrid:
    """The cells a table should show; those without a row are listed as not run."""

    optimizers: list[str]
    variants: list[str]
    drop_rates: list[float]


def missing_rows(rows: list[dict], *, task: str, split: str, grid: ExpectedGrid) -> list[dict]:
    present = {(r["optimizer"], r["variant"], r["drop_rate"]) for r in rows}
    missing = []
    for optimizer in grid.optimizers:
        for drop_rate in grid.drop_rates:
            for variant in grid.variants:
                if (optimizer, variant, drop_rate) not in present:
                    missing.append({
                        "task": task, "optimizer": optimizer, "variant": variant, "drop_rate": drop_rate,
                        "split": split, "metric": "not run", "examples": "", "commands": [],
                    })
    return missing


def render_table(
    records: list[dict],
    *,
    task: str,
    split: str,
    grid: ExpectedGrid | None = None,
    variants: list[str] | None = None,
    optimizers: list[str] | None = None,
    drop_rates: list[float] | None = None,
) -> str:
    """Render one task's rows as a markdown table, followed by the commands of each numbered row.

    With `variants`, `optimizers` or `drop_rates`, only the base row and the rows that match every
    given filter are shown. A fine-tune row has no drop rate, so it passes the drop-rate filter.
    """
    rows = latest_rows(records, task=task, split=split)
    if variants is not None:
        rows = [r for r in rows if r["variant"] in REFERENCE_MODELS or r["variant"] in variants]
    if optimizers is not None:
        rows = [r for r in rows if r["optimizer"] is None or r["optimizer"] in optimizers]
    if drop_rates is not None:
        rows = [r for r in rows if r["drop_rate"] is None or r["drop_rate"] in drop_rates]
    if not rows:
        return ""
    if grid is not None:
        rows = sorted(rows + missing_rows(rows, task=task, split=split, grid=grid), key=table_order)
    lines = [
        "| # | optimizer | method | drop rate | q | score | examples | delta MB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    commands = []
    for number, r in enumerate(rows, start=1):
        q = format_q(r)
        size = "" if r.get("nbytes") is None else f"{r['nbytes'] / 1e6:.2f}"
        drop = "" if r["drop_rate"] is None else f"{r['drop_rate']:g}"
        lines.append(f"| {number} | {r['optimizer'] or '-'} | {r['variant']} | {drop} | {q} | {format_value(r)} | {r['examples']} | {size} |")
        if r["commands"]:
            commands.append(f"# {number}\n" + "\n".join(r["commands"]))
    return "\n".join(lines) + "\n\n```\n" + "\n".join(commands) + "\n```"


# ---------------------------------------------------------------------------------------------
# entry point


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    inputs = commands.add_parser("inputs", help="write calibration and search-validation files per task")
    inputs.add_argument("--base", type=Path, required=True, help="base model folder whose chat template renders the text")
    inputs.add_argument("--data-dir", type=Path, default=Path("data"), help="prepared task data (default: data)")
    inputs.add_argument("--work", type=Path, required=True, help="working folder; inputs go to WORK/inputs")
    inputs.add_argument("--task", action="append", choices=TASKS, help="repeatable (default: all)")

    run = commands.add_parser("run", help="compress and score a grid, appending rows to the results file")
    run.add_argument("--base", type=Path, required=True, help="base model folder")
    run.add_argument("--runs", type=Path, required=True, help="folder of fine-tunes named <task>-<optimizer>")
    run.add_argument("--data-dir", type=Path, default=Path("data"), help="prepared task data (default: data)")
    run.add_argument("--work", type=Path, required=True, help="working folder: deltas, logs, inputs")
    run.add_argument("--results", type=Path, default=None, help="JSONL results file (default: WORK/results.jsonl)")
    run.add_argument("--task", action="append", choices=TASKS, help="repeatable (default: all)")
    run.add_argument("--optimizer", action="append", choices=OPTIMIZERS, help="repeatable (default: all)")
    run.add_argument("--variant", action="append", choices=sorted(VARIANTS), help="repeatable (default: none, only references)")
    run.add_argument("--drop-rate", action="append", type=float, help="repeatable, run in the order given")
    run.add_argument("--split", choices=("validation", "test"), default="test")
    run.add_argument("--limit", type=int, default=None, help="score only the first N examples of the split")
    run.add_argument("--references", action="store_true", help="also score the base and each fine-tune")
    run.add_argument("--batch-size", type=int, default=16, help="examples per scoring batch (default: 16)")
    run.add_argument("--threads", type=int, default=1, help="CPU threads for torch in this process (default: 1)")
    run.add_argument(
        "--start-before", type=utc_time, default=None,
        help="start no cell at or after this time, ISO 8601, UTC unless it names a zone (e.g. 2026-12-05T00:20); a running cell finishes",
    )

    recommend = commands.add_parser("recommend", help="run `deltamux recommend` per fine-tune, appending its pick as a row")
    recommend.add_argument("--base", type=Path, required=True, help="base model folder")
    recommend.add_argument("--runs", type=Path, required=True, help="folder of fine-tunes named <task>-<optimizer>")
    recommend.add_argument("--work", type=Path, required=True, help="working folder: inputs, logs")
    recommend.add_argument("--results", type=Path, default=None, help="JSONL results file (default: WORK/results.jsonl)")
    recommend.add_argument("--task", action="append", choices=TASKS, help="repeatable (default: all)")
    recommend.add_argument("--optimizer", action="append", choices=OPTIMIZERS, help="repeatable (default: all)")
    recommend.add_argument("--drop-rates", default="0.9,0.99,0.999", help="comma-separated drop rates to search (default: the grid's, 0.9,0.99,0.999)")
    recommend.add_argument("--threads", type=int, default=1, help="CPU threads for torch in `deltamux recommend` (default: 1)")

    table = commands.add_parser("table", help="print markdown tables of a results file")
    table.add_argument("--results", type=Path, required=True)
    table.add_argument("--split", default="test")
    table.add_argument("--runs", type=Path, default=None, help="with --expect-*: list missing cells of each finished fine-tune as not run")
    table.add_argument("--task", action="append", choices=TASKS, help="repeatable (default: all)")
    table.add_argument("--expect-optimizer", action="append", choices=OPTIMIZERS, default=None)
    table.add_argument("--expect-variant", action="append", choices=sorted(VARIANTS), default=None)
    table.add_argument("--expect-drop-rate", action="append", type=float, default=None)
    table.add_argument("--variant", action="append", choices=sorted(VARIANTS), help="show only these variants (repeatable; default: all)")
    table.add_argument("--optimizer", action="append", choices=OPTIMIZERS, help="show only these fine-tunes' rows (repeatable; default: all)")
    table.add_argument("--drop-rate", action="append", type=float, help="show only cells at these drop rates (repeatable; default: all)")
    table.add_argument(
        "--part", action="append", choices=("tasks", "recommender"),
        help="print the per-task tables, the recommender table or both (repeatable; default: both)",
    )
    return parser


def utc_time(text: str) -> datetime:
    """Parse an ISO 8601 time for argparse, as UTC when it names no zone."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"invalid time {text!r}: use ISO 8601, for example 2026-12-05T00:20") from e
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if args.command == "inputs":
        prepare_inputs(base=args.base, data_dir=args.data_dir, work=args.work, tasks=args.task or list(TASKS))
        return 0

    if args.command == "table":
        records = read_rows(args.results)
        parts = args.part or ["tasks", "recommender"]
        for task in args.task or TASKS:
            grid = None
            if args.expect_variant and args.expect_drop_rate:
                optimizers = [
                    optimizer for optimizer in args.expect_optimizer or OPTIMIZERS
                    if args.runs is None or finetune_folder(args.runs, task, optimizer) is not None
                ]
                grid = ExpectedGrid(optimizers=optimizers, variants=args.expect_variant, drop_rates=args.expect_drop_rate)
            table = render_table(
                records, task=task, split=args.split, grid=grid, variants=args.variant,
                optimizers=args.optimizer, drop_rates=args.drop_rate,
            )
            if table and "tasks" in parts:
                print(f"### {task}\n\n{table}\n")
        recommendations = render_recommendations(records, split=args.split, tasks=args.task or list(TASKS))
        if recommendations and "recommender" in parts:
            print(f"### recommender\n\n{recommendations}\n")
        return 0

    if args.command == "recommend":
        run_recommendations(
            base=args.base, runs=args.runs, work=args.work, results=args.results or args.work / "results.jsonl",
            tasks=args.task or list(TASKS), optimizers=args.optimizer or list(OPTIMIZERS),
            drop_rates=args.drop_rates, threads=args.threads,
        )
        return 0

    import torch

    torch.set_num_threads(args.threads)
    settings = GridSettings(
        base=args.base, runs=args.runs, data_dir=args.data_dir, work=args.work,
        results=args.results or args.work / "results.jsonl", tasks=args.task or list(TASKS),
        optimizers=args.optimizer or list(OPTIMIZERS), variants=args.variant or [],
        drop_rates=args.drop_rate or [], split=args.split, limit=args.limit,
        references=args.references, batch_size=args.batch_size, start_before=args.start_before,
    )
    run_grid(settings)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

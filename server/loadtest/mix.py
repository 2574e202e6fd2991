"""Task mixes: which task each request of a load test goes to.

A mix spec is one of:

- `uniform`: every task equally often;
- `zipf:S`: the task at rank k (1-based, in the order of --tasks) with probability proportional to
  1 / k**S, so S = 0 is uniform and a larger S sends more traffic to the first tasks;
- `trace:FILE`: replay recorded arrivals. Each non-blank line of FILE is `SECONDS TASK` or
  `SECONDS,TASK` (seconds since the start of the run); lines starting with `#` are comments.
  A trace fixes both the arrival times and the tasks, so it takes no --rate.

Mixes are registered as data in MIX_KINDS; `parse_mix` looks a spec up there.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path


class MixSpecError(ValueError):
    """A mix spec or trace file that cannot be used."""


@dataclass(frozen=True)
class Arrival:
    """One recorded request of a trace: when it starts (seconds from the run start) and its task."""

    offset: float
    task: str


@dataclass(frozen=True)
class TaskMix:
    """Task probabilities, or a fixed list of arrivals when the mix is a trace."""

    spec: str
    tasks: tuple[str, ...]
    weights: tuple[float, ...]  # normalized, one per task
    trace: tuple[Arrival, ...] | None = None

    def draw(self, rng: random.Random) -> str:
        """Draw one task with the mix's probabilities."""
        return rng.choices(self.tasks, weights=self.weights, k=1)[0]

    def probabilities(self) -> dict[str, float]:
        return dict(zip(self.tasks, self.weights, strict=True))


def _uniform(argument: str | None, tasks: Sequence[str]) -> TaskMix:
    if argument is not None:
        raise MixSpecError(f"mix 'uniform' takes no argument, got 'uniform:{argument}'; write 'uniform'")
    share = 1.0 / len(tasks)
    return TaskMix(spec="uniform", tasks=tuple(tasks), weights=tuple(share for _ in tasks))


def _zipf(argument: str | None, tasks: Sequence[str]) -> TaskMix:
    if argument is None:
        raise MixSpecError("mix 'zipf' needs an exponent, for example 'zipf:1.1'")
    try:
        exponent = float(argument)
    except ValueError as e:
        raise MixSpecError(f"invalid Zipf exponent {argument!r}; write a number, for example 'zipf:1.1'") from e
    if not 0.0 <= exponent <= 10.0 or exponent != exponent:
        raise MixSpecError(f"the Zipf exponent must be in [0, 10], got {exponent!r}")
    raw = [1.0 / (rank**exponent) for rank in range(1, len(tasks) + 1)]
    total = sum(raw)
    return TaskMix(spec=f"zipf:{exponent:g}", tasks=tuple(tasks), weights=tuple(w / total for w in raw))


def _trace(argument: str | None, tasks: Sequence[str]) -> TaskMix:
    if not argument:
        raise MixSpecError("mix 'trace' needs a file, for example 'trace:arrivals.txt'")
    arrivals = read_trace(Path(argument))
    unknown = sorted({a.task for a in arrivals} - set(tasks))
    if unknown:
        raise MixSpecError(
            f"trace {argument!r} names tasks missing from --tasks: {unknown[:5]!r}; add them to --tasks"
        )
    counts = {task: 0 for task in tasks}
    for arrival in arrivals:
        counts[arrival.task] += 1
    weights = tuple(counts[task] / len(arrivals) for task in tasks)
    return TaskMix(spec=f"trace:{argument}", tasks=tuple(tasks), weights=weights, trace=tuple(arrivals))


MIX_KINDS: dict[str, Callable[[str | None, Sequence[str]], TaskMix]] = {
    "uniform": _uniform,
    "zipf": _zipf,
    "trace": _trace,
}


def parse_mix(spec: str, tasks: Sequence[str]) -> TaskMix:
    """Build the mix named by `spec` over `tasks` (see the module docstring for the forms)."""
    if not tasks:
        raise MixSpecError("the task list is empty; pass --tasks a,b,c")
    if len(set(tasks)) != len(tasks):
        raise MixSpecError(f"the task list names a task twice: {list(tasks)!r}")
    kind, separator, argument = spec.partition(":")
    builder = MIX_KINDS.get(kind.strip().lower())
    if builder is None:
        raise MixSpecError(f"unknown mix {spec!r}; use one of: uniform, zipf:S, trace:FILE")
    return builder(argument if separator else None, list(tasks))


def read_trace(path: Path) -> list[Arrival]:
    """Read a trace file of `SECONDS TASK` lines, sorted by time."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise MixSpecError(f"cannot read trace file {str(path)!r}: {e.strerror or e}") from e
    arrivals = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.replace(",", " ").split()
        if len(fields) != 2:
            raise MixSpecError(f"{path}:{number}: expected 'SECONDS TASK', got {line!r}")
        try:
            offset = float(fields[0])
        except ValueError as e:
            raise MixSpecError(f"{path}:{number}: invalid time {fields[0]!r}; write seconds from the run start") from e
        if not offset >= 0.0:
            raise MixSpecError(f"{path}:{number}: the time must be 0 or more seconds, got {offset!r}")
        arrivals.append(Arrival(offset=offset, task=fields[1]))
    if not arrivals:
        raise MixSpecError(f"trace file {str(path)!r} has no arrivals; write one 'SECONDS TASK' line per request")
    return sorted(arrivals, key=lambda a: a.offset)

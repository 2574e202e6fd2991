"""The server on CUDA in bfloat16: swaps restore the base bit-exactly and tasks still differ."""

from __future__ import annotations

import shutil
from pathlib import Path

import openai
import pytest
import torch

from deltastore.apply import model_params
from server.settings import Settings
from tests.server.support import start_server, weights_hash

pytestmark = pytest.mark.gpu


def test_bfloat16_swaps_restore_base_exactly(tiny_base: Path, delta_files: dict[str, Path], tmp_path: Path) -> None:
    for task in ("alpha", "beta"):
        shutil.copy(delta_files[task], tmp_path)
    settings = Settings(base=tiny_base, store=tmp_path, device="cuda", dtype="auto", base_name="base", max_batch_size=4)
    server = start_server(settings)
    try:
        runtime = server.runtime
        assert runtime.placement.dtype == torch.bfloat16
        before = weights_hash(model_params(runtime.model))
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)

        outputs = {}
        for _ in range(3):
            for model in ("alpha", "beta", "base"):
                result = client.completions.create(model=model, prompt="The quick brown fox", max_tokens=12, temperature=0)
                outputs.setdefault(model, set()).add(result.choices[0].text)

        assert runtime.engine.current_task == "base"
        assert weights_hash(model_params(runtime.model)) == before
        assert all(len(texts) == 1 for texts in outputs.values())  # each task repeats its own greedy output
        assert outputs["alpha"] != outputs["base"]
        assert runtime.engine.swap_count == 9
    finally:
        server.stop()

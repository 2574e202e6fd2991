"""On CUDA: bfloat16 swaps restore the base bit-exactly, tasks still differ, mixed batches match merged rows."""

from __future__ import annotations

import shutil
from pathlib import Path

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM

from deltastore.apply import apply, decode, model_params, restore
from deltastore.format import read_delta
from server.mixing import MixedBatch, prepare
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


@torch.no_grad()
def test_mixed_batch_on_cuda_matches_merged_rows(tiny_base: Path, delta_files: dict[str, Path]) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).to("cuda").eval()
    params = model_params(model)
    decoded = {task: decode(read_delta(delta_files[task]), device="cuda") for task in ("alpha", "beta")}
    ids = torch.tensor([[5, 9, 13, 2], [11, 3, 8, 21], [6, 6, 30, 12]], device="cuda")

    with MixedBatch(model, [prepare(model, decoded["alpha"]), None, prepare(model, decoded["beta"])]):
        mixed = model(input_ids=ids).logits
    for row, task in ((0, "alpha"), (2, "beta")):
        applied = apply(params, decoded[task])
        merged = model(input_ids=ids[row : row + 1]).logits[0]
        restore(params, applied)
        torch.testing.assert_close(mixed[row], merged, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(mixed[1], model(input_ids=ids[1:2]).logits[0], atol=1e-5, rtol=1e-5)

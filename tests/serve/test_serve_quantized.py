"""`lightningllm serve` of an int4 export written by `lightningllm quantize`: its answer is the offline greedy one."""

from __future__ import annotations

import pytest
import torch

from lightningllm.cli import main
from lightningllm.generation import generate
from lightningllm.io import load
from lightningllm.serve.launch import ServerProcess

openai = pytest.importorskip("openai")
pytest.importorskip("torchao")


@pytest.mark.slow
def test_a_quantised_export_serves_its_offline_greedy_answer(served_export, tmp_path):
    main(["quantize", str(served_export), str(tmp_path / "int4"), "--bits", "4", "--group_size", "32"])
    model, tokenizer = load(tmp_path / "int4")
    ids = torch.tensor([[tokenizer.bos_id, *tokenizer.encode("To be")]])
    tokens = generate(model, ids, 16, temperature=0.0, eos_id=tokenizer.eos_id)[0, ids.shape[1] :].tolist()
    offline = tokenizer.decode(tokens[: tokens.index(tokenizer.eos_id)] if tokenizer.eos_id in tokens else tokens)
    with ServerProcess(tmp_path / "int4", log_path=tmp_path / "server.log") as live:
        client = openai.OpenAI(base_url=live.base_url, api_key="unused", max_retries=0, timeout=120)
        answer = client.completions.create(model="int4", prompt="To be", max_tokens=16, temperature=0)
    assert answer.choices[0].text == offline

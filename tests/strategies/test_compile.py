"""compile_blocks: KV-cache decoding through compiled blocks equals eager and compiles a fixed number of graphs."""

import torch
from torch._dynamo.utils import counters

from lightningllm.generation import generate
from lightningllm.models import Decoder
from lightningllm.strategies import compile_blocks


def test_decoding_through_compiled_blocks_equals_eager_without_a_recompile_per_token(decoder_factory):
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = decoder_factory(vocab_size=16, max_seq_len=16)
    eager = Decoder.from_config(model.config)
    eager.load_state_dict(model.state_dict())
    compile_blocks(model, backend="eager")  # dynamo's tracing and guards, without the C++ compiler's minutes
    compile_blocks(model, backend="eager")  # idempotent
    assert list(model.state_dict()) == list(eager.state_dict())
    prompt = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    with torch.no_grad():
        # 40 new tokens through a 16-position window: one-token steps at every cache length, and slides that
        # re-encode half the window
        compiled = generate(model, prompt, 40, top_k=1)
        assert torch.equal(compiled, generate(eager, prompt, 40, top_k=1))
        assert torch.equal(compiled, generate(model, prompt, 40, top_k=1))
    assert counters["frames"]["ok"] == counters["frames"]["total"] > 0  # traced, and never gave up for eager
    # the prompt, the one-token step, the slide's re-encoding: not one graph per cache length (40+)
    assert counters["stats"]["unique_graphs"] <= 4

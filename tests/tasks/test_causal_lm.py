"""CausalLM with our Decoder and with a user's own Trainer and DataLoader."""

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightningllm.tasks import CausalLM


def cycle_batches(vocab_size=16, length=33, n=64):
    """Sequences of a fixed cycle with random phase: perfectly predictable after one token."""
    starts = torch.randint(0, vocab_size, (n, 1))
    return (starts + torch.arange(length)) % vocab_size


def trainer(tmp_path, **kwargs):
    defaults = dict(
        max_steps=60, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu",
    )  # fmt: skip
    return L.Trainer(**{**defaults, **kwargs})


def test_loss_is_cross_entropy_on_shifted_tokens(decoder_factory):
    torch.manual_seed(0)
    task = CausalLM(decoder_factory(vocab_size=16))
    batch = cycle_batches(n=4)
    loss, logits, labels = task.loss(batch)
    expected = F.cross_entropy(task.model(batch[:, :-1]).reshape(-1, 16), batch[:, 1:].reshape(-1))
    assert torch.allclose(loss, expected)
    as_dict = {"input_ids": batch[:, :-1], "labels": batch[:, 1:]}
    assert torch.allclose(task.loss(as_dict)[0], expected)


def test_dict_batch_without_labels_predicts_the_next_token_not_the_previous(decoder_factory):
    torch.manual_seed(0)
    task = CausalLM(decoder_factory(vocab_size=16))
    batch = cycle_batches(n=4)  # (B, T + 1), the shape TextDataModule's windows have before the split
    loss, logits, labels = task.loss({"input_ids": batch})
    assert torch.equal(labels, batch[:, 1:])
    torch.testing.assert_close(logits, task.model(batch[:, :-1]))
    expected = F.cross_entropy(task.model(batch[:, :-1]).reshape(-1, 16), batch[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, expected)


def test_fit_with_own_trainer_and_dataloader_lowers_loss(decoder_factory, tmp_path):
    torch.manual_seed(0)
    task = CausalLM(decoder_factory(vocab_size=16), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2), warmup_steps=5)
    data = cycle_batches()
    before = task.loss(data[:16])[0].item()
    trainer(tmp_path).fit(task, DataLoader(data, batch_size=16, shuffle=True))
    after = task.loss(data[:16])[0].item()
    assert after < 0.2 * before


def test_python_checkpoint_reloads_with_the_model_passed_again(decoder_factory, tmp_path):
    torch.manual_seed(0)
    task = CausalLM(decoder_factory(vocab_size=16), warmup_steps=3)
    t = trainer(tmp_path, max_steps=3)
    t.fit(task, DataLoader(cycle_batches(), batch_size=8))
    t.save_checkpoint(tmp_path / "last.ckpt")
    assert "model" not in task.hparams and task.hparams["warmup_steps"] == 3
    reloaded = CausalLM.load_from_checkpoint(tmp_path / "last.ckpt", model=decoder_factory(vocab_size=16))
    ids = cycle_batches(n=2)
    torch.testing.assert_close(reloaded.model(ids), task.model.eval()(ids))


def test_activation_checkpointing_gives_the_same_gradients(llama_like):
    torch.manual_seed(0)
    batch = torch.randint(0, 50, (2, 17))
    grads = []
    for checkpointing in (False, True):
        model = type(llama_like).from_config(llama_like.config)
        model.load_state_dict(llama_like.state_dict())
        task = CausalLM(model, activation_checkpointing=checkpointing)
        task.configure_model()
        task.loss(batch)[0].backward()
        assert checkpointing == any("checkpoint_wrapped" in n for n, _ in task.model.named_modules())
        grads.append({n.replace("._checkpoint_wrapped_module", ""): p.grad for n, p in task.model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name])


def test_reuse_the_decoder_inside_a_users_own_lightning_module(decoder_factory, tmp_path):
    class FirstTokenClassifier(L.LightningModule):
        def __init__(self, backbone: nn.Module) -> None:
            super().__init__()
            self.backbone = backbone
            self.head = nn.Linear(backbone.dim, 2)

        def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
            ids, label = batch
            return F.cross_entropy(self.head(self.backbone.hidden_states(ids)[:, -1]), label)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=3e-3)

    torch.manual_seed(0)
    ids = torch.randint(0, 2, (128, 6))
    labels = ids[:, 0]  # must look back to the first position
    model = FirstTokenClassifier(decoder_factory(vocab_size=2))
    loss_before = F.cross_entropy(model.head(model.backbone.hidden_states(ids)[:, -1]), labels).item()
    trainer(tmp_path, max_steps=150).fit(model, DataLoader(list(zip(ids, labels)), batch_size=32, shuffle=True))
    loss_after = F.cross_entropy(model.head(model.backbone.hidden_states(ids)[:, -1]), labels).item()
    assert loss_after < 0.5 * loss_before


@pytest.mark.parametrize("precision", ["bf16-mixed"])
def test_trains_under_mixed_precision(decoder_factory, tmp_path, precision):
    torch.manual_seed(0)
    task = CausalLM(decoder_factory(vocab_size=16), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2), warmup_steps=5)
    data = cycle_batches()
    before = task.loss(data[:16])[0].item()
    trainer(tmp_path, precision=precision).fit(task, DataLoader(data, batch_size=16, shuffle=True))
    assert task.loss(data[:16])[0].item() < 0.3 * before


def test_tokenizer_larger_than_model_vocabulary_is_refused(decoder_factory, tmp_path):
    from lightningllm.data import TextDataModule
    from lightningllm.errors import ConfigError
    from lightningllm.registry import get

    (tmp_path / "a.txt").write_text("abcdefghijklmnopqrstuvwxyz " * 200)
    (tmp_path / "b.txt").write_text("zyxwvutsrqponmlkjihgfedcba " * 200)
    data = TextDataModule(get("tokenizer", "CharTokenizer")(), corpus=str(tmp_path), seq_len=16,
                          batch_size=4, data_dir=str(tmp_path / "cache"))  # fmt: skip
    task = CausalLM(decoder_factory(vocab_size=10))
    with pytest.raises(ConfigError, match="tokenizer has 32 tokens but the model's vocab_size is 10"):
        trainer(tmp_path, max_steps=1).fit(task, datamodule=data)


def test_python_checkpoint_with_a_data_module_loads_with_weights_only(decoder_factory, tmp_path):
    from lightningllm.data import TextDataModule
    from lightningllm.registry import get

    for name in ("a", "b"):
        (tmp_path / f"{name}.txt").write_text("the quick brown fox jumps over the lazy dog. " * 40)
    data = TextDataModule(get("tokenizer", "CharTokenizer")(), corpus=str(tmp_path), seq_len=16,
                          batch_size=4, data_dir=str(tmp_path / "cache"))  # fmt: skip
    task = CausalLM(decoder_factory(vocab_size=data.vocab_size))
    t = trainer(tmp_path, max_steps=2)
    t.fit(task, datamodule=data)
    t.save_checkpoint(tmp_path / "last.ckpt")
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert "tokenizer" not in checkpoint["datamodule_hyper_parameters"]
    assert checkpoint["datamodule_hyper_parameters"]["seq_len"] == 16


def test_bidirectional_model_is_refused():
    from lightningllm.errors import ConfigError
    from lightningllm.models import Encoder
    from lightningllm.registry import get

    encoder = Encoder(vocab_size=20, dim=16, n_layers=1, n_heads=2, attention=get("attention", "MultiHeadAttention"),
                      ffn=get("ffn", "MLP"), norm=get("norm", "LayerNorm"), position=get("position", "NoPosition"),
                      block=get("block", "PreNorm"))  # fmt: skip
    with pytest.raises(ConfigError, match="Encoder attends bidirectionally"):
        CausalLM(encoder)


@pytest.mark.slow  # inductor compiles C++ for each graph: ~40 s of CPU (the eager-backend check is in the default run)
def test_compile_switch_trains_and_decodes_with_the_kv_cache_like_eager(decoder_factory, tmp_path):
    from torch._dynamo.utils import counters

    from lightningllm.generation import generate
    from lightningllm.models import Decoder

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    task = CausalLM(decoder_factory(vocab_size=16, max_seq_len=16), compile=True, warmup_steps=1)
    data = (torch.randint(0, 16, (8, 1)) + torch.arange(9)) % 16
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(task, DataLoader(data, batch_size=4))
    assert trainer.global_step == 2
    model = task.model
    assert all(blk._compiled_call_impl is not None for blk in model.blocks)  # each Block compiled in place
    eager = Decoder.from_config(model.config)
    eager.load_state_dict(model.state_dict())  # names unchanged by compiling
    prompt = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    with torch.no_grad():
        cache, eager_cache = model.make_cache(2, 12), eager.make_cache(2, 12)
        torch.testing.assert_close(model(prompt, cache=cache), eager(prompt, cache=eager_cache))
        for token in ([[9], [10]], [[11], [12]]):  # single-token steps through the preallocated cache
            step = torch.tensor(token)
            torch.testing.assert_close(model(step, cache=cache), eager(step, cache=eager_cache))
        greedy = generate(model, prompt, 8, top_k=1)  # 12 positions: fills the window and no slide
        assert torch.equal(greedy, generate(eager, prompt, 8, top_k=1))
    assert counters["stats"]["unique_graphs"] > 0  # the compiled blocks ran (graphs were captured)

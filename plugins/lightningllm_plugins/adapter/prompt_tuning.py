"""Prompt tuning: ``n`` trainable soft tokens prepended to every sequence's embeddings (Lester et al., 2021).

The token embedding is wrapped by a :class:`PromptEmbedding` that keeps it as ``base_layer`` and holds the soft
tokens by name (``prompt[name]``: (n, dim)), as Hugging Face PEFT holds its ``prompt_embeddings``. The model asks
its embedding for :meth:`PromptEmbedding.soft_tokens` when a sequence starts (no cache yet), runs its blocks on
``[soft tokens, token embeddings]`` with the mask and positions widened by ``n`` (the soft tokens take positions
``0..n-1``, as in PEFT), and returns the hidden states of the real tokens only, so a task's loss is unchanged.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from torch import Tensor, nn

from lightningllm.adapters import AdapterError, check_adapter_name, parameters_of, train_only
from lightningllm.contracts import Adapter, AdapterModule
from lightningllm.errors import ConfigError
from lightningllm.registry import register

log = logging.getLogger(__name__)

INITS = ("vocab", "random", "ids")


class SoftPrompt(nn.Module):
    """One adapter's soft tokens ``weight`` (n, dim): copies of the embeddings of ``init_ids``, or Normal(0, 1).

    It re-initialises by its own rule (also when FSDP materialises it from the meta device), reading the
    vocabulary embeddings it was given without holding them as a submodule.
    """

    def __init__(self, vocabulary: nn.Embedding, n_tokens: int, init_ids: list[int] | None) -> None:
        super().__init__()
        weight = vocabulary.weight
        self.weight = nn.Parameter(torch.empty(n_tokens, weight.shape[1], device=weight.device, dtype=weight.dtype))
        self.init_ids = init_ids
        self._vocabulary = [vocabulary]  # a list: not registered, so its weight stays the embedding's alone
        self.reset_parameters()

    def reset_parameters(self) -> None:
        vocabulary = self._vocabulary[0].weight
        if self.weight.is_meta:
            return
        with torch.no_grad():
            if self.init_ids is None or vocabulary.is_meta:
                nn.init.normal_(self.weight)  # PEFT's random init: an nn.Embedding's N(0, 1)
            else:
                self.weight.copy_(vocabulary[torch.tensor(self.init_ids, device=vocabulary.device)])


class PromptEmbedding(AdapterModule):
    """The token embedding, plus soft tokens by name that the model prepends to each new sequence.

    Args:
        base_layer: the frozen ``nn.Embedding`` it wraps (its weight keeps its name under ``base_layer.``).
    """

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.prompt = nn.ModuleDict()
        self.enabled, self.active, self.merged = True, [], []

    @property
    def weight(self) -> Tensor:
        """The vocabulary embeddings (vocab_size, dim) (tied heads and size checks read them)."""
        return self.base_layer.weight

    def add_adapter(self, name: str, n_tokens: int, init_ids: list[int] | None) -> None:
        """Add ``n_tokens`` soft tokens under ``name`` and make them active."""
        self.prompt[name] = SoftPrompt(self.base_layer, n_tokens, init_ids)
        self.active.append(name)

    def adapter_names(self) -> list[str]:
        return list(self.prompt)

    def adapter_params(self, name: str) -> list[str]:
        return [f"prompt.{name}.weight"]

    def reset_parameters(self) -> None:
        """Each prompt by its own rule; the embedding is left alone."""
        for prompt in self.prompt.values():
            prompt.reset_parameters()

    def forward(self, input_ids: Tensor) -> Tensor:
        """input_ids: (B, T) -> token embeddings (B, T, dim); the soft tokens are prepended by the model."""
        return self.base_layer(input_ids)

    def soft_tokens(self) -> Tensor | None:
        """The active soft tokens in order (n, dim), or None when there are none or adapters are disabled."""
        if not self.enabled or not self.active:
            return None
        return torch.cat([self.prompt[name].weight for name in self.active])

    def merge(self) -> None:
        raise AdapterError(
            "Cannot merge a prompt-tuning adapter: its soft tokens are extra inputs, not a change of any weight, so "
            "no merged model computes the same outputs. Keep it unmerged (save_adapter writes it alone)."
        )

    def unmerge(self) -> None:
        """Nothing is ever merged."""

    def unload(self) -> nn.Module:
        return self.base_layer

    def extra_repr(self) -> str:
        sizes = {name: self.prompt[name].weight.shape[0] for name in self.prompt}
        return f"soft_tokens={sizes}, active={self.active}"


@register("adapter")
class PromptTuning(Adapter):
    """Soft tokens prepended to every sequence; everything else is frozen.

    Args:
        n_tokens: how many soft tokens (PEFT's ``num_virtual_tokens``).
        init: ``vocab`` (copies of the embeddings of ``n_tokens`` random vocabulary ids, drawn with ``seed``),
            ``ids`` (copies of the embeddings of ``init_ids``, e.g. a tokenized task description, repeated or cut
            to ``n_tokens`` as PEFT does with its init text) or ``random`` (Normal(0, 1)).
        init_ids: token ids for ``init: ids``.
        seed: the seed of ``init: vocab``.
        name: the adapter's name; another PromptTuning with another name adds its tokens after this one's.
    """

    def __init__(
        self,
        n_tokens: int = 20,
        init: Literal["vocab", "random", "ids"] = "vocab",
        init_ids: list[int] | None = None,
        seed: int = 0,
        name: str = "default",
    ) -> None:
        _check_options(n_tokens, init, init_ids, name)
        self.n_tokens, self.init, self.seed, self.name = n_tokens, init, seed, name
        self.init_ids = list(init_ids) if init_ids is not None else None
        self.config = {"n_tokens": n_tokens, "init": init, "init_ids": self.init_ids, "seed": seed, "name": name}

    def apply(self, model: nn.Module) -> None:
        """Wrap ``model.embed`` (or add to its wrapper) and freeze all but this adapter's soft tokens."""
        embed = getattr(model, "embed", None)
        if not getattr(model, "takes_virtual_tokens", False) or not isinstance(embed, nn.Embedding | PromptEmbedding):
            raise ConfigError(
                f"PromptTuning needs a model that prepends soft tokens to its token embeddings (Decoder); "
                f"{type(model).__name__} does not. Use LoRA or another adapter on it."
            )
        if isinstance(embed, PromptEmbedding) and self.name in embed.adapter_names():
            raise ConfigError(
                f"The embedding already holds soft tokens named {self.name!r}; give the second PromptTuning "
                f"another name (name: ...). It holds: {', '.join(embed.adapter_names())}."
            )
        vocab_size = embed.weight.shape[0]
        ids = self._ids(vocab_size)
        if not isinstance(embed, PromptEmbedding):
            embed = PromptEmbedding(embed)
            model.embed = embed
        embed.add_adapter(self.name, self.n_tokens, ids)
        log.info("PromptTuning %r (%d soft tokens, init %s): %s", self.name, self.n_tokens, self.init,
                 train_only(model, parameters_of([embed], self.name)))  # fmt: skip

    def _ids(self, vocab_size: int) -> list[int] | None:
        if self.init == "random":
            return None
        if self.init == "vocab":
            generator = torch.Generator().manual_seed(self.seed)
            return torch.randint(0, vocab_size, (self.n_tokens,), generator=generator).tolist()
        bad = [i for i in self.init_ids if not 0 <= i < vocab_size]
        if bad:
            raise ConfigError(
                f"PromptTuning init_ids {bad[:5]} are outside the vocabulary: the model has {vocab_size} token ids "
                f"(0..{vocab_size - 1})."
            )
        repeats = -(-self.n_tokens // len(self.init_ids))
        return (self.init_ids * repeats)[: self.n_tokens]


def _check_options(n_tokens: int, init: str, init_ids: list[int] | None, name: str) -> None:
    if not isinstance(n_tokens, int) or isinstance(n_tokens, bool) or n_tokens <= 0:
        raise ConfigError(f"PromptTuning n_tokens={n_tokens!r} is not a positive integer: give e.g. 20 soft tokens.")
    if init not in INITS:
        raise ConfigError(f"PromptTuning init={init!r} is not an initialisation: choose one of {', '.join(INITS)}.")
    if (init == "ids") != (init_ids is not None) or (init_ids is not None and not init_ids):
        raise ConfigError(
            f"PromptTuning init={init!r} with init_ids={init_ids!r}: give a non-empty init_ids (token ids, e.g. a "
            "tokenized task description) exactly when init is 'ids'."
        )
    check_adapter_name("PromptTuning", name)

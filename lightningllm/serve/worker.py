"""The inference worker: LitServe hands it the requests that arrived together; one ``generate`` decodes them.

LitServe's batched streaming loop collects up to ``max_batch_size`` requests (waiting at most
``batch_timeout`` seconds for more) and calls :meth:`GenerationAPI.predict` with the list. Requests that
sample alike (temperature, top-p, seed) share one :func:`~lightningllm.generation.generate` call, left-padded;
each keeps its own token budget and stop strings through :class:`~lightningllm.serve.rows.RowWatch`, which
also reports every step's new text, so ``predict`` yields one list of per-request updates per step and the
HTTP side streams them as they come. Greedy answers are the offline ``generate`` answers: a batch decodes as
each row would alone.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import litserve as ls
import torch
from litserve.loops.streaming_loops import BatchedStreamingLoop
from litserve.specs.base import LitSpec

from lightningllm.generation import generate
from lightningllm.serve.rows import Row, RowWatch

log = logging.getLogger("lightningllm.serve")


@dataclass(frozen=True)
class Job:
    """One request as the worker receives it (validated and tokenised by the HTTP side).

    Args:
        prompt_ids: the prompt's token ids.
        max_tokens: the most tokens to generate.
        temperature: 0 is greedy.
        top_p: nucleus sampling mass (1: every token).
        stop: strings that end the answer (not part of it).
        seed: seeds the sampling of the jobs that share it (None: the worker's generator).
    """

    prompt_ids: tuple[int, ...]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @property
    def sampling(self) -> tuple:
        """What jobs must share to decode in one call."""
        return self.temperature, self.top_p, self.seed


#: What predict yields per step: one dict per job of the batch ({} when a job has nothing new).
Update = dict


class GenerationAPI(ls.LitAPI):
    """LitServe API of an export: loads it on the worker's device and decodes batches of :class:`Job`.

    Args:
        export_dir: the export folder (config, weights, tokenizer).
        trust_code: let the export's config import classes outside lightningllm and its plugins.
        seed: seeds the worker's sampling generator.
        max_batch_size, batch_timeout: LitServe's batching: the most requests decoded together, and how long
            (seconds) the first one waits for others.
        spec: the HTTP side (:class:`~lightningllm.serve.spec.OpenAICompatibleSpec`).
    """

    def __init__(
        self, export_dir: str, *, trust_code: bool = False, seed: int = 1234, max_batch_size: int = 8,
        batch_timeout: float = 0.01, spec: LitSpec | None = None,
    ) -> None:  # fmt: skip
        super().__init__(
            max_batch_size=max_batch_size, batch_timeout=batch_timeout, spec=spec, loop=BatchedStreamingLoop()
        )
        self.export_dir, self.trust_code, self.seed = export_dir, trust_code, seed

    def setup(self, device: str) -> None:
        from lightningllm.io import load

        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the server stops workers
        if not log.handlers:  # a spawned process: LitServe configures only its own loggers
            log.addHandler(logging.StreamHandler())
            log.setLevel(logging.INFO)

        self.model, self.tokenizer = load(self.export_dir, device=device, trust_code=self.trust_code)
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(self.seed)
        log.info("worker ready: %s on %s (%d CPU threads)", self.export_dir, device, torch.get_num_threads())

    def decode_request(self, request: Job) -> Job:
        return request

    def batch(self, inputs: list[Job]) -> list[Job]:
        return list(inputs)

    def predict(self, jobs: list[Job]) -> Iterator[list[Update]]:
        """Decode ``jobs`` on a thread; yield each step's updates as the thread reports them."""
        updates: queue.Queue = queue.Queue()
        thread = threading.Thread(target=self._decode_all, args=(jobs, updates.put), daemon=True)
        thread.start()
        while (item := updates.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
        thread.join()

    def unbatch(self, output: Iterator[list[Update]]) -> Iterator[list[Update]]:
        return output

    def encode_response(self, output: Iterator[list[Update]]) -> Iterator[list[Update]]:
        yield from output

    def _decode_all(self, jobs: list[Job], report) -> None:
        """Decode the jobs, one ``generate`` per sampling group; report updates, then None (or the error)."""
        start = time.perf_counter()
        try:
            groups: dict[tuple, list[int]] = {}
            for i, job in enumerate(jobs):
                groups.setdefault(job.sampling, []).append(i)
            tokens = sum(self._decode_group([jobs[i] for i in members], members, len(jobs), report)
                         for members in groups.values())  # fmt: skip
            log.info(
                "decoded a batch of %d request(s) in %d group(s): %d tokens in %.2f s",
                len(jobs), len(groups), tokens, time.perf_counter() - start,
            )  # fmt: skip
            report(None)
        except BaseException as err:  # noqa: BLE001 - handed to predict, which raises it in LitServe's loop
            report(err)

    def _decode_group(self, jobs: list[Job], members: list[int], batch_size: int, report) -> int:
        """One ``generate`` call for jobs that sample alike -> the tokens they generated."""

        def on_step(deltas: list[str | None]) -> None:
            step: list[Update] = [{} for _ in range(batch_size)]
            for i, job, row, delta in zip(members, jobs, rows, deltas):
                if delta is not None:
                    step[i] = _update(row, delta, len(job.prompt_ids))
            report(step)

        rows = [Row(job.max_tokens, job.stop) for job in jobs]
        watch = RowWatch(rows, self.tokenizer.decode, self.tokenizer.eos_id, on_step)
        first = jobs[0]
        generator = self.generator
        if first.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(first.seed)
        generate(
            self.model, [torch.tensor(job.prompt_ids, device=self.device) for job in jobs],
            max(job.max_tokens for job in jobs), temperature=first.temperature, top_p=first.top_p,
            eos_id=self.tokenizer.eos_id, stop=watch, vocab_limit=self.tokenizer.vocab_size, generator=generator,
        )  # fmt: skip
        cut_short = [row.finish_reason is None for row in rows]
        if any(cut_short):  # generate ended before the watch did (it should not): close those rows as cut short
            for row, short in zip(rows, cut_short):
                row.finish_reason = "length" if short else row.finish_reason
            on_step([row.delta() if short else None for row, short in zip(rows, cut_short)])
        return sum(row.tokens for row in rows)


def _update(row: Row, delta: str, prompt_tokens: int) -> Update:
    """A job's update after a step: its new text and, once it is finished, why and how many tokens."""
    if row.finish_reason is None:
        return {"text": delta} if delta else {}
    return {
        "text": delta, "finish_reason": row.finish_reason,
        "prompt_tokens": prompt_tokens, "completion_tokens": row.tokens,
    }  # fmt: skip

"""The model runner: routing of rows to adapter slots, the classification forward, and the count
of failed forwards that tells a failing batch (its requests fail, serving goes on) from a broken
device (the engine stops and /readyz turns false)."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from prometheus_client import Counter

from app.engine.grammar import Grammars
from app.engine.logits import RowState
from app.engine.types import RowOutput, SamplingParams, TokenLogprob
from app.errors import EngineFailure
from app.models.base_lm import BaseLM
from app.models.heads import Head, activate
from app.models.multi_lora import MultiLoraLinear, Routing, RoutingContext
from app.models.one_row import OneRowDecoder
from app.platform import return_freed_memory


def last_non_pad_index(input_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Position of the last non-pad token of each row, as ``LlamaForSequenceClassification`` pools."""
    non_pad = (input_ids != pad_id).int()  # [batch, tokens]
    positions = torch.arange(input_ids.shape[-1], device=input_ids.device, dtype=torch.int32)
    return (positions * non_pad).argmax(-1)


LOGPROB_CHUNK = 256  # prompt positions whose logits [positions, vocab] are made at once


@dataclass(frozen=True)
class Row:
    """One input of a classification-lane forward: its slot, tokens and what it gives (probs,
    embedding or per-token logprobs with ``top`` alternatives)."""

    slot: int
    ids: list[int]
    output: RowOutput = "probs"
    top: int = 0


def length_groups(lengths: list[int], waste: float = 1.25, least: int = 8) -> list[list[int]]:
    """The rows (indices into ``lengths``) split into forwards of similar lengths: sorted by length,
    a group closes before a row that would pad it beyond ``waste`` × its real tokens, once it holds
    ``least`` rows (fewer, larger forwards otherwise). On 2 cores, 256 texts of 10-40 tokens through
    all-MiniLM-L6-v2: 615 texts/s in length-sorted forwards of 32-64 against 460 in arrival order."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    groups: list[list[int]] = []
    group: list[int] = []
    real = 0
    for i in order:
        if len(group) >= least and (len(group) + 1) * lengths[i] > waste * (real + lengths[i]):
            groups.append(group)
            group, real = [], 0
        group.append(i)
        real += lengths[i]
    return [*groups, group] if group else groups


log = logging.getLogger(__name__)
_BATCHES = {"classify": "classification", "generate": "generation", "prefill": "prefill"}


class DeviceBroken(RuntimeError):
    """Forwards keep failing: the engine cannot serve any more (unrecoverable)."""


class ForwardHealth:
    """Consecutive failed forwards. A failure fails only its batch; ``limit`` failures in a row (no
    forward succeeding in between) mean the device itself is broken, which stops the engine."""

    def __init__(self, limit: int, device: torch.device, counter: Counter | None = None) -> None:
        self.limit = limit
        self.device = device
        self.counter = counter  # adapterserve_forward_failures_total{task}
        self.failures = 0

    def succeeded(self) -> None:
        self.failures = 0

    def batch_failed(self, exc: BaseException, task: str, fail: Callable[[EngineFailure], None]) -> None:
        """A batch's forward raised ``exc``: its requests fail with :class:`EngineFailure` (500
        ``engine_error``) through ``fail``, and the failure is counted (:meth:`failed`)."""
        log.error("%s batch failed", task, exc_info=exc)
        fail(EngineFailure(f"the {_BATCHES[task]} batch failed; see the server log"))
        self.failed(exc, task)

    def failed(self, exc: BaseException, task: str) -> None:
        """Record a failed forward; raise :class:`DeviceBroken` when it is the ``limit``-th in a row."""
        self.failures += 1
        if self.counter is not None:
            self.counter.labels(task=task).inc()
        if isinstance(exc, torch.OutOfMemoryError) and self.device.type == "cuda":
            torch.cuda.empty_cache()  # the failed batch's activations go back to the allocator
        if self.failures >= self.limit:
            raise DeviceBroken(f"{self.failures} forwards failed in a row; the last: {exc!r}") from exc
        log.warning("forward failed (%d in a row of %d allowed)", self.failures, self.limit)


class Runner:
    """Owns the model on the engine thread and runs batched forwards for any mix of slots."""

    def __init__(
        self,
        base: BaseLM,
        ctx: RoutingContext,
        failure_limit: int = 3,
        failures: Counter | None = None,
        one_row: bool = True,
        native_step: bool = True,
    ) -> None:
        self.base = base
        self.health = ForwardHealth(failure_limit, base.device, failures)
        self.ctx = ctx
        self.model = base.model
        self.device = base.device
        self.surface = base.surface
        tok = base.tokenizer
        self.pad_id: int = int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        generation_config = getattr(base.model, "generation_config", None)
        eos = generation_config.eos_token_id if generation_config is not None else None
        eos_ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
        self.eos_ids: set[int] = {int(e) for e in [*eos_ids, tok.eos_token_id] if e is not None}
        self.vocab = int(getattr(base.model.config, "vocab_size", None) or len(tok))  # logits' width
        self.grammars = Grammars(tok, self.vocab, self.eos_ids)
        # the decode step of a batch of one row, where the family has one (app/models/one_row.py)
        self.one_row = OneRowDecoder.of(base.model, native_step) if one_row else None
        native = self.one_row.native if self.one_row is not None else None
        # the dtype new generation caches keep keys and values in (None: the model's)
        self.kv_dtype: torch.dtype | None = (
            torch.bfloat16 if native is not None and native.bf16_cache else None
        )

    def drop_batch_copies(self, layers: Iterable[MultiLoraLinear]) -> None:
        """Free the copies of adapter weights laid out for the last mixed batch (the engine, when it
        goes idle: a burst over many adapters leaves up to a copy of every row's adapter behind) and
        give the memory back to the system."""
        dropped = [layer.drop_batch_copies() for layer in layers]
        if self.one_row is not None:
            self.one_row.drop_batch_copies()
        if any(dropped) and self.device.type == "cpu":
            return_freed_memory()

    def row_state(self, params: SamplingParams, prompt: list[int]) -> RowState | None:
        """A generation row's logits-processing state (None when it asks for none)."""
        matcher = self.grammars.matcher(params.grammar) if params.grammar is not None else None
        return RowState.of(params, prompt, self.vocab, self.device, matcher)

    def pad(self, seqs: list[list[int]], left: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask [rows, longest] on the device, padded on the left or right."""
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, toks in enumerate(seqs):
            cols = slice(width - len(toks), width) if left else slice(0, len(toks))
            ids[i, cols] = torch.tensor(toks)
            mask[i, cols] = 1
        return ids.to(self.device), mask.to(self.device)

    @contextmanager
    def routed(self, slots: list[int], reuse_key: int | None = None) -> Iterator[None]:
        """Route the rows of the forwards inside to ``slots`` (one per row), cleared on the way out."""
        self.ctx.routing = Routing.build(slots, self.device, reuse_key)
        try:
            yield
        finally:
            self.ctx.routing = None

    @torch.inference_mode()
    def classify(self, rows: list[Row], heads: dict[int, Head]) -> list[Any]:
        """Each row's output (:class:`Row`): forwards over rows of similar lengths (:func:`length_groups`),
        then, per run of rows with one output and slot, the slot's head on their pooled states (the
        family's pooling: last token or [CLS]) for class probabilities, the base's pooling for
        embeddings (:mod:`app.models.pooling`), or the LM head for each token's log-probability."""
        out: list[Any] = [None] * len(rows)
        for group in length_groups([len(r.ids) for r in rows]):
            order = sorted(group, key=lambda i: (rows[i].output, rows[i].slot))
            for i, result in zip(order, self._classify([rows[i] for i in order], heads), strict=True):
                out[i] = result
        return out

    def _classify(self, rows: list[Row], heads: dict[int, Head]) -> list[Any]:
        ids, mask = self.pad([r.ids for r in rows], left=False)  # right padding, as in training
        out: list[Any] = []
        with self.routed([r.slot for r in rows]):
            hidden = self.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
            pooled = self._pool(hidden, lambda: last_non_pad_index(ids, self.pad_id))
            at = 0
            for (output, slot), run in itertools.groupby(rows, key=lambda r: (r.output, r.slot)):
                n = len(list(run))
                rows_of = slice(at, at + n)
                if output == "logprobs":
                    out += [self._logprobs(hidden[i, : len(rows[i].ids)], rows[i]) for i in range(at, at + n)]
                elif output == "embedding":
                    out += self.base.pooling.pool(hidden[rows_of], mask[rows_of]).cpu().tolist()
                else:
                    logits = self._head(heads[slot], slot, pooled[rows_of]).float()
                    out += torch.softmax(logits, dim=-1).cpu().tolist()
                at += n
        return out

    def _logprobs(self, hidden: torch.Tensor, row: Row) -> list[TokenLogprob]:
        """Each token's log-probability after the ones before it (all but the first), with its
        ``row.top`` most likely alternatives, from one row's states [tokens, dim]."""
        head = self.model.get_output_embeddings()
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        out: list[TokenLogprob] = []
        for start in range(0, len(row.ids) - 1, LOGPROB_CHUNK):  # [chunk, vocab] at a time
            end = min(start + LOGPROB_CHUNK, len(row.ids) - 1)
            with self.routed([row.slot]):
                logits = head(hidden[start:end].unsqueeze(0))[0].float()
            if cap is not None:
                logits = torch.tanh(logits / cap) * cap
            lps = torch.log_softmax(logits[:, : self.vocab], dim=-1)
            nxt = torch.tensor(row.ids[start + 1 : end + 1], device=lps.device)
            chosen = lps.gather(1, nxt.unsqueeze(1))[:, 0].tolist()
            values, indices = lps.topk(row.top, dim=-1)  # (top 0: empty rows)
            alternatives = zip(indices.tolist(), values.tolist(), strict=True)
            for tok, lp, (ks, vs) in zip(nxt.tolist(), chosen, alternatives, strict=True):
                out.append(TokenLogprob(tok, lp, tuple(zip(ks, vs, strict=True))))
        return out

    def embedded_logits(self, slot: int, head: Head) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The classification logits of embedded rows (embeddings [rows, tokens, dim], right-padded
        mask) through ``slot``'s adapter and ``head``: what :mod:`app.engine.explain` differentiates."""

        def logits(embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            with self.routed([slot] * embeds.shape[0]):
                hidden = self.model.base_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
            return self._head(head, slot, self._pool(hidden, lambda: mask.sum(-1) - 1))

        return logits

    def embed(self, ids: list[list[int]]) -> list[torch.Tensor]:
        """Each token list's input embeddings [tokens, dim] (what the model's first layer reads)."""
        table = self.model.get_input_embeddings()
        with torch.no_grad():
            return [table(torch.tensor([row], device=self.device))[0] for row in ids]

    def _pool(self, hidden: torch.Tensor, last: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Each row's state for its classification head: the first token's or (``last``: each
        row's last real position) the last token's, as the family pools."""
        if self.surface.pooling == "first":
            return hidden[:, 0]
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last()]

    def _head(self, head: Head, slot: int, x: torch.Tensor) -> torch.Tensor:
        """The logits of one slot's rows: its head layers (a layer without weights is the base's own
        module, run with this slot's routing: LoRA on BERT's pooler applies)."""
        for layer in head:
            if layer.weight is None:
                with self.routed([slot] * x.shape[0]):
                    x = self.model.get_submodule(layer.module)(x)
            else:
                x = torch.nn.functional.linear(x, layer.weight, layer.bias)
            x = activate(x, layer.activation)
        return x

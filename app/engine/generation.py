"""Continuous batching for generation: rows join at the next step and leave as soon as they finish.

A :class:`GenerationBatch` holds left-padded rows over one KV cache. New requests are prefilled
in a batch of their own, in chunks of a bounded number of tokens interleaved with the decode steps
of the running batch; the last chunk samples their first token, and the batch is then merged into
the running one by left-padding the shorter cache. Rows that finish, are cancelled or reach their
deadline are dropped from the cache at once, and leading columns that no row needs any more are
trimmed. The cache operations themselves live in :mod:`app.engine.kv_cache`.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from app.engine import kv_cache
from app.engine.detokenize import Decode, IncrementalDetokenizer
from app.engine.logits import RowState, logprobs_of, process
from app.engine.prefix_cache import PrefixCache
from app.engine.runner import Runner
from app.engine.sampling import find_stop, make_generator, select_tokens
from app.engine.types import FinishReason, GenerateWork, GenerationResult, StreamDelta, TokenLogprob

Finished = list[tuple[GenerateWork, GenerationResult]]
_compositions = itertools.count(1)


@dataclass
class _Row:
    work: GenerateWork
    slot: int
    generator: torch.Generator
    detok: IncrementalDetokenizer
    text: str = ""  # the output so far (cut at a stop string when one is found)
    emitted: int = 0  # characters of ``text`` already streamed
    uid: int | None = None  # the adapter version in ``slot``
    # ensemble generation: the member rows follow the first (lead) row of their request, which
    # samples from the weighted mean of the members' distributions and alone holds the output
    lead: _Row | None = None  # None: this row leads (every row of a plain request does)
    weight: float = 1.0
    cached: int = 0  # prompt tokens taken from the prefix cache
    state: RowState | None = None  # penalties, bias, grammar (lead rows that ask for them)
    logprobs: list[TokenLogprob] | None = None  # per generated token, when asked
    logprobs_emitted: int = 0  # entries of ``logprobs`` already streamed

    @property
    def tokens(self) -> list[int]:
        return self.detok.tokens


class GenerationBatch:
    """Rows generating together; see the module docstring for the invariants."""

    def __init__(
        self,
        runner: Runner,
        rows: list[_Row],
        cache: DynamicCache,
        mask: torch.Tensor,
        decode: Decode,
        prefix: PrefixCache | None = None,
    ) -> None:
        self.runner = runner
        self.prefix = prefix  # where finished rows leave their prompt and answer
        self.rows = rows
        self.cache = cache
        self.decode = decode
        self.mask = mask  # [batch, cached tokens + 1]: 1 where a row has a real token
        self.positions = torch.empty(0)  # [batch, 1] position of each row's next input token
        self.next_ids = torch.empty(0)  # [batch, 1] each row's next input token
        self._composition: int | None = None  # identifies the row set for reusing gathered weights
        # while prefilling: the padded prompts [batch, width], their mask and positions; chunks done
        self._prompt: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._done = 0

    def __len__(self) -> int:
        return len(self.rows)

    # --- prefill ----------------------------------------------------------------------------
    @classmethod
    @torch.inference_mode()
    def start(
        cls,
        runner: Runner,
        works: list[tuple[GenerateWork, list[int]]],
        decode: Decode,
        prefix: PrefixCache | None = None,
    ) -> GenerationBatch:
        """A batch of new rows whose prompts still have to be prefilled (see :meth:`prefill_chunk`);
        each request comes with the slots of its rows (one, or one per ensemble member). Rows whose
        prompt begins with a prefix in ``prefix`` start from its keys and values (:func:`_reused`)."""
        dev = runner.device
        rows: list[_Row] = []
        for w, slots in works:
            lead: _Row | None = None
            for member, slot in zip(w.rows, slots, strict=True):
                uid, weight = member.uid, member.weight
                if lead is None:
                    gen, detok = make_generator(w.params.seed, dev), IncrementalDetokenizer(decode)
                    lead = _Row(w, slot, gen, detok, uid=uid, weight=weight)
                    lead.state = runner.row_state(w.params, w.prompt)
                    lead.logprobs = [] if w.params.logprobs is not None else None
                    rows.append(lead)
                else:
                    rows.append(_Row(w, slot, lead.generator, lead.detok, uid=uid, lead=lead, weight=weight))
        # left padding: every row's next token is at the end
        ids, mask = runner.pad([row.work.prompt for row in rows], left=True)
        cache, done = _reused(runner, rows, prefix)
        batch = cls(runner, rows, cache, mask, decode, prefix)
        batch._prompt = (ids, mask, (mask.cumsum(-1) - 1).clamp(min=0))
        batch._done = done
        return batch

    @torch.inference_mode()
    def prefill_chunk(self, max_tokens: int) -> Finished | None:
        """Prefill the next chunk of at most ``max_tokens`` padded tokens.

        Returns None while the prompts are not complete; after the last chunk, the rows have their
        first token and the rows that already finished are returned.
        """
        assert self._prompt is not None
        ids, mask, positions = self._prompt
        width = ids.shape[1]
        end = min(width, self._done + max(1, max_tokens // len(self.rows)))
        self.mask = mask[:, :end]
        begin, self._done = self._done, end
        if end < width:
            self._run(ids[:, begin:end], positions[:, begin:end])
            return None
        self._prompt = None
        return self._forward(ids[:, begin:], positions[:, begin:])

    # --- decode -----------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> Finished:
        """One decode step for every row; return the rows that finished."""
        if self._composition is None:  # rows joined or left: gather per-row adapter weights anew
            self._composition = next(_compositions)
        return self._forward(self.next_ids, self.positions, self._composition)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, reuse_key: int | None = None) -> Finished:
        r = self.runner
        logits = self._run(ids, positions, reuse_key)
        leads = [row for row in self.rows if row.lead is None]
        if len(leads) < len(self.rows):
            logits = self._mixtures(logits)
        chosen = select_tokens(
            process(logits, [row.state for row in leads], sorted(r.eos_ids)),
            [row.work.params.temperature for row in leads],
            [row.work.params.top_p for row in leads],
            [row.generator for row in leads],
        )
        logprobs = logprobs_of(logits, chosen, [row.work.params.logprobs for row in leads])
        now = time.monotonic()
        finished: Finished = []
        token: dict[int, int] = {}  # id(lead row) -> its token
        going: set[int] = set()  # id(lead row) of the requests that continue
        for row, tok, lp in zip(leads, chosen, logprobs, strict=True):
            token[id(row)] = tok
            if row.work.first_token_at is None:
                row.work.first_token_at = now
            if row.logprobs is not None and lp is not None:
                row.logprobs.append(lp)
            result = self._advance(row, tok)
            if result is not None:
                finished.append((row.work, result))
            elif not row.work.cancelled:
                going.add(id(row))
        keep = [i for i, row in enumerate(self.rows) if id(row.lead or row) in going]
        if self.prefix is not None and finished:
            self._leave_prefixes({id(work) for work, _ in finished})
        self.positions = positions[:, -1:] + 1
        tokens = [token[id(row.lead or row)] for row in self.rows]
        self.next_ids = torch.tensor(tokens, dtype=torch.long, device=r.device).unsqueeze(1)
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        self.keep(keep)
        return finished

    def _leave_prefixes(self, works: set[int]) -> None:
        """Cache the prompt and answer of the rows of finished ``works`` (what their cache holds:
        every token fed so far) under their adapter version, for the conversation's next turn."""
        assert self.prefix is not None
        lengths = self.mask.sum(dim=1).tolist()
        for i, row in enumerate(self.rows):
            if id(row.work) not in works:
                continue
            prompt = row.work.prompt
            length = int(lengths[i])
            ids = [*prompt, *row.tokens[: length - len(prompt)]]
            kv_of = kv_cache.row_prefix(self.cache, i, length)
            if kv_of is not None and len(ids) == length:
                self.prefix.insert(row.uid, ids, kv_of)

    def _run(self, ids: torch.Tensor, positions: torch.Tensor, reuse_key: int | None = None) -> torch.Tensor:
        """Forward ``ids`` [batch, tokens] through the model and cache; last-token logits [batch, vocab]."""
        r = self.runner
        slots = [row.slot for row in self.rows]
        if (one_row := r.one_row) is not None and one_row.applies(self.cache, self.mask, ids.shape[1]):
            single = slots[0] if len(set(slots)) == 1 else None  # (None: each row its own adapter)
            with r.routed(slots, reuse_key):
                return one_row(ids, positions, self.cache, single, self.mask)
        with r.routed(slots, reuse_key):
            out = r.model(
                input_ids=ids,
                attention_mask=self.mask,
                position_ids=positions,
                cache=self.cache,
                use_cache=True,
                logits_to_keep=1,
            )
        logits: torch.Tensor = out.logits[:, -1, :]
        return logits

    def _mixtures(self, logits: torch.Tensor) -> torch.Tensor:
        """One row of logits per lead row [leads, vocab]: a plain request's own, an ensemble's the
        log of the weighted mean of its members' next-token distributions."""
        groups: dict[int, list[int]] = {}
        for i, row in enumerate(self.rows):
            groups.setdefault(id(row.lead or row), []).append(i)
        out = []
        for members in groups.values():
            if len(members) == 1:
                out.append(logits[members[0]].float())
                continue
            index = torch.tensor(members, device=logits.device)
            weights = torch.tensor([self.rows[i].weight for i in members], device=logits.device)
            probs = torch.softmax(logits.index_select(0, index).float(), dim=-1)
            mean = (weights.unsqueeze(1) * probs).sum(0) / weights.sum()
            out.append(mean.log())
        return torch.stack(out)

    def _advance(self, row: _Row, tok: int) -> GenerationResult | None:
        params = row.work.params
        result: GenerationResult | None = None
        grammar_ended = False
        if row.state is not None:
            grammar_ended = not row.state.advance(tok) or row.state.grammar_done
        if tok in self.runner.eos_ids and not params.ignore_eos:
            row.detok.flush()
            row.text = row.detok.text
            result = _result(row, "stop")
        else:
            searched = max(0, len(row.text) - max((len(s) for s in params.stop), default=0) + 1)
            row.detok.add(tok)
            if len(row.tokens) >= params.max_new_tokens:
                row.detok.flush()
            row.text = row.detok.text
            cut = find_stop(row.text, params.stop, searched)
            if cut >= 0:
                row.text = row.text[:cut]
                result = _result(row, "stop")
            elif grammar_ended:  # the grammar allows nothing more (or refused the token)
                row.detok.flush()
                row.text = row.detok.text
                result = _result(row, "stop")
            elif len(row.tokens) >= params.max_new_tokens:
                result = _result(row, "length")
        if row.work.sink is not None:
            _emit(row, result)
        return result

    # --- deadlines --------------------------------------------------------------------------
    def cut_off(self, now: float) -> Finished:
        """End the rows whose deadline passed with the text they have (``finish_reason`` timeout)."""
        expired = [
            i for i, row in enumerate(self.rows) if row.work.deadline <= now and not row.work.cancelled
        ]
        if not expired:
            return []
        finished: Finished = []
        for i in expired:
            row = self.rows[i]
            if row.lead is not None:  # an ensemble member: its lead row answers
                continue
            row.detok.flush()
            row.text = row.detok.text
            result = _result(row, "timeout")
            if row.work.sink is not None:
                _emit(row, result)
            finished.append((row.work, result))
        gone = set(expired)
        self.keep([i for i in range(len(self.rows)) if i not in gone])
        return finished

    # --- batch composition ------------------------------------------------------------------
    @torch.inference_mode()  # (the cache's tensors are inference tensors, changed in place)
    def keep(self, indices: list[int]) -> None:
        """Keep only the rows at ``indices`` (finished and cancelled rows leave the cache now)."""
        if len(indices) == len(self.rows):
            return
        self._composition = None
        self.rows = [self.rows[i] for i in indices]
        if not indices:
            return
        index = torch.tensor(indices, dtype=torch.long, device=self.runner.device)
        kv_cache.select_rows(self.cache, index)
        self.mask = self.mask.index_select(0, index)
        self.positions = self.positions.index_select(0, index)
        self.next_ids = self.next_ids.index_select(0, index)
        self._trim()

    @torch.inference_mode()
    def split(self, indices: list[int]) -> GenerationBatch:
        """Move the rows at ``indices`` into a batch of their own, which keeps their cache and next
        tokens as they are (it rejoins this one with :meth:`extend`)."""
        index = torch.tensor(indices, dtype=torch.long, device=self.runner.device)
        cache = kv_cache.split_rows(self.cache, index)
        other = GenerationBatch(
            self.runner, [self.rows[i] for i in indices], cache, self.mask.index_select(0, index), self.decode
        )
        other.positions = self.positions.index_select(0, index)
        other.next_ids = self.next_ids.index_select(0, index)
        gone = set(indices)
        self.keep([i for i in range(len(self.rows)) if i not in gone])
        other._trim()
        return other

    def remap_slots(self, moves: dict[int, int]) -> None:
        """Follow adapters that the device slots moved (compaction) to their new slots."""
        for row in self.rows:
            row.slot = moves.get(row.slot, row.slot)
        self._composition = None

    def drop_cancelled(self) -> None:
        self.keep([i for i, row in enumerate(self.rows) if not row.work.cancelled])

    @torch.inference_mode()
    def _trim(self) -> None:
        """Drop leading cache columns that are padding for every row."""
        if self._prompt is not None or not kv_cache.mergeable(self.cache):  # sliding windows keep theirs
            return
        start = kv_cache.unused_leading_columns(self.mask)
        if start:
            kv_cache.trim_left(self.cache, start)
            self.mask = self.mask[:, start:]

    @torch.inference_mode()
    def extend(self, other: GenerationBatch) -> None:
        """Merge the rows of a freshly prefilled (or a set-aside) batch into this running one."""
        if not other.rows:
            return
        mine, theirs = self.mask.shape[1], other.mask.shape[1]
        kv_cache.merge_left_padded(self.cache, mine, other.cache, theirs)
        width = max(mine, theirs)
        self.mask = torch.cat(
            [kv_cache.pad_left(self.mask, width - mine, 1), kv_cache.pad_left(other.mask, width - theirs, 1)]
        )
        self.positions = torch.cat([self.positions, other.positions])
        self.next_ids = torch.cat([self.next_ids, other.next_ids])
        self.rows += other.rows
        self._composition = None


def _reused(runner: Runner, rows: list[_Row], prefix: PrefixCache | None) -> tuple[DynamicCache, int]:
    """The cache a new batch starts from (its rows' cached prefixes: :meth:`PrefixCache.reuse`), and
    how many of its padded columns it holds already."""
    if prefix is not None:
        parts, cached, columns = prefix.reuse([(row.uid, row.work.prompt) for row in rows])
        if columns:
            for row, n in zip(rows, cached, strict=True):
                row.cached = n
            return kv_cache.prefilled(runner.model.config, parts, columns, runner.kv_dtype), columns
    return kv_cache.new_cache(runner.model.config, runner.kv_dtype), 0


def _result(row: _Row, reason: FinishReason) -> GenerationResult:
    return GenerationResult(
        text=row.text,
        token_ids=list(row.tokens),
        finish_reason=reason,
        prompt_tokens=len(row.work.prompt),
        # one per returned token: the end-of-sequence token that ended the row is not one
        logprobs=list(row.logprobs[: len(row.tokens)]) if row.logprobs is not None else None,
        cached_tokens=row.cached,
    )


def _emit(row: _Row, result: GenerationResult | None) -> None:
    """Stream the text that can no longer change (held back: a possible stop-string prefix)."""
    sink: Callable[[StreamDelta], None] | None = row.work.sink
    assert sink is not None
    if result is not None:
        safe = len(row.text)
    else:
        hold = max((len(s) - 1 for s in row.work.params.stop), default=0)
        safe = len(row.text) - hold
    if safe > row.emitted or result is not None:
        logprobs: tuple[TokenLogprob, ...] = ()
        if row.logprobs is not None:  # the tokens so far (their text may still be held back)
            logprobs = tuple(row.logprobs[row.logprobs_emitted : len(row.tokens)])
            row.logprobs_emitted = max(row.logprobs_emitted, len(row.tokens))
        sink(
            StreamDelta(text=row.text[row.emitted : max(safe, row.emitted)], result=result, logprobs=logprobs)
        )
        row.emitted = max(safe, row.emitted)

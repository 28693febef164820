"""Forward passes over mixed-adapter batches: classification and step-wise generation."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from app.engine.sampling import find_stop, make_generator, select_tokens
from app.engine.types import GenerateWork, GenerationResult
from app.models.base import BaseModel
from app.models.lora import Routing, RoutingContext


def last_non_pad_index(input_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Position of the last non-pad token of each row, as ``LlamaForSequenceClassification`` pools."""
    non_pad = (input_ids != pad_id).int()  # [batch, tokens]
    positions = torch.arange(input_ids.shape[-1], device=input_ids.device, dtype=torch.int32)
    return (positions * non_pad).argmax(-1)


class Runner:
    """Owns the model on the engine thread and runs batched forwards for any mix of slots."""

    def __init__(self, base: BaseModel, ctx: RoutingContext) -> None:
        self.base = base
        self.ctx = ctx
        self.model = base.model
        self.device = base.device
        tok = base.tokenizer
        self.pad_id: int = int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        eos = base.model.generation_config.eos_token_id
        eos_ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
        self.eos_ids: set[int] = {int(e) for e in [*eos_ids, tok.eos_token_id] if e is not None}

    def set_routing(self, slots: list[int]) -> None:
        self.ctx.routing = Routing.build(slots, self.device)

    @torch.inference_mode()
    def classify(
        self, rows: list[tuple[int, list[int]]], heads: dict[int, tuple[torch.Tensor, torch.Tensor | None]]
    ) -> list[list[float]]:
        """Class probabilities for each (slot, token ids) row; one forward for the whole batch."""
        width = max(len(ids) for _, ids in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (_, toks) in enumerate(rows):  # right padding, as in training
            ids[i, : len(toks)] = torch.tensor(toks)
            mask[i, : len(toks)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        self.set_routing([slot for slot, _ in rows])
        try:
            hidden = self.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        finally:
            self.ctx.routing = None
        pooled = hidden[torch.arange(len(rows), device=self.device), last_non_pad_index(ids, self.pad_id)]
        out: list[list[float]] = [[] for _ in rows]
        for slot in {slot for slot, _ in rows}:
            idx = [i for i, (s, _) in enumerate(rows) if s == slot]
            weight, bias = heads[slot]
            logits = torch.nn.functional.linear(pooled[idx], weight, bias)
            probs = torch.softmax(logits.float(), dim=-1).cpu().tolist()
            for i, p in zip(idx, probs, strict=True):
                out[i] = p
        return out


@dataclass
class _Row:
    work: GenerateWork
    slot: int
    generator: torch.Generator
    tokens: list[int] = field(default_factory=list)
    text: str = ""


class GenerationBatch:
    """Rows generating together over one KV cache; finished rows leave the batch at once."""

    def __init__(self, runner: Runner, works: list[tuple[GenerateWork, int]]) -> None:
        self.runner = runner
        dev = runner.device
        self.rows = [_Row(w, slot, make_generator(w.params.seed, dev)) for w, slot in works]
        width = max(len(w.prompt) for w, _ in works)
        ids = torch.full((len(works), width), runner.pad_id, dtype=torch.long)
        mask = torch.zeros((len(works), width), dtype=torch.long)
        for i, (w, _) in enumerate(works):  # left padding: every row's next token is at the end
            ids[i, width - len(w.prompt) :] = torch.tensor(w.prompt)
            mask[i, width - len(w.prompt) :] = 1
        self.mask = mask.to(dev)
        self.positions = (self.mask.cumsum(-1) - 1).clamp(min=0)  # [batch, tokens]
        self.cache = DynamicCache(config=runner.model.config)
        self._pending_ids = ids.to(dev)

    def __len__(self) -> int:
        return len(self.rows)

    @torch.inference_mode()
    def step(self, decode: Callable[[list[int]], str]) -> list[tuple[GenerateWork, GenerationResult]]:
        """Run one forward (prefill on the first call), pick one token per row; return finished rows."""
        r = self.runner
        r.set_routing([row.slot for row in self.rows])
        try:
            out = r.model(
                input_ids=self._pending_ids,
                attention_mask=self.mask,
                position_ids=self.positions,
                cache=self.cache,
                use_cache=True,
                logits_to_keep=1,
            )
        finally:
            r.ctx.routing = None
        logits = out.logits[:, -1, :]
        chosen = select_tokens(
            logits,
            [row.work.params.temperature for row in self.rows],
            [row.work.params.top_p for row in self.rows],
            [row.generator for row in self.rows],
        )
        finished: list[tuple[GenerateWork, GenerationResult]] = []
        keep: list[int] = []
        for i, (row, tok) in enumerate(zip(self.rows, chosen, strict=True)):
            result = self._advance(row, tok, decode)
            if result is None and not row.work.cancelled:
                keep.append(i)
            elif result is not None:
                finished.append((row.work, result))
        self._prune(keep, chosen)
        return finished

    def _advance(self, row: _Row, tok: int, decode: Callable[[list[int]], str]) -> GenerationResult | None:
        params = row.work.params
        if tok in self.runner.eos_ids:
            return self._result(row, "stop")
        row.tokens.append(tok)
        row.text = decode(row.tokens)
        cut = find_stop(row.text, params.stop)
        if cut >= 0:
            row.text = row.text[:cut]
            return self._result(row, "stop")
        if len(row.tokens) >= params.max_new_tokens:
            return self._result(row, "length")
        return None

    @staticmethod
    def _result(row: _Row, reason: str) -> GenerationResult:
        return GenerationResult(
            text=row.text,
            token_ids=list(row.tokens),
            finish_reason="stop" if reason == "stop" else "length",
            prompt_tokens=len(row.work.prompt),
        )

    def _prune(self, keep: list[int], chosen: list[int]) -> None:
        dev = self.runner.device
        if len(keep) < len(self.rows):
            self.rows = [self.rows[i] for i in keep]
            if not keep:
                return
            index = torch.tensor(keep, dtype=torch.long, device=dev)
            self.cache.batch_select_indices(index)
            self.mask = self.mask.index_select(0, index)
            self.positions = self.positions.index_select(0, index)
            chosen = [chosen[i] for i in keep]
        self._pending_ids = torch.tensor(chosen, dtype=torch.long, device=dev).unsqueeze(1)
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        self.positions = self.positions[:, -1:] + 1

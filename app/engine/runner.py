"""The model runner: routing of rows to adapter slots, and the classification forward."""

from __future__ import annotations

import torch

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

    def set_routing(self, slots: list[int], reuse_key: int | None = None) -> None:
        self.ctx.routing = Routing.build(slots, self.device, reuse_key)

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

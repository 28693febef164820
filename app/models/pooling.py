"""How the base turns token states into one sentence embedding: as its sentence-transformers
configuration says (``modules.json`` naming a ``Pooling`` module and, optionally, ``Normalize``), or
else the family's default: the mean of the real tokens' states for encoders, the last real token's
state for decoders, normalized to unit length either way (as OpenAI's embeddings are)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

log = logging.getLogger(__name__)

Mode = Literal["mean", "cls", "last", "max", "mean_sqrt_len", "weightedmean"]
# 1_Pooling/config.json's flags -> the mode (sentence-transformers' names)
_FLAGS: dict[str, Mode] = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_lasttoken": "last",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_weightedmean_tokens": "weightedmean",
}


@dataclass(frozen=True)
class Pooling:
    mode: Mode
    normalize: bool
    source: str  # where it was read from ("modules.json", or "the family's default")

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One vector per row of ``hidden`` [rows, tokens, dim] (``mask`` [rows, tokens]: 1 on real
        tokens, right-padded), in float32."""
        h = hidden.float()
        m = mask.to(h.dtype).unsqueeze(-1)
        if self.mode == "cls":
            out = h[:, 0]
        elif self.mode == "last":
            last = mask.sum(-1).long() - 1
            out = h[torch.arange(h.shape[0], device=h.device), last]
        elif self.mode == "max":
            out = h.masked_fill(m == 0, float("-inf")).max(dim=1).values
        elif self.mode == "weightedmean":  # the k-th real token weighs k
            w = m * torch.arange(1, h.shape[1] + 1, device=h.device, dtype=h.dtype).view(1, -1, 1)
            out = (h * w).sum(1) / w.sum(1).clamp(min=1e-9)
        else:
            total, count = (h * m).sum(1), m.sum(1).clamp(min=1e-9)
            out = total / (count.sqrt() if self.mode == "mean_sqrt_len" else count)
        return torch.nn.functional.normalize(out, dim=-1) if self.normalize else out


def read_pooling(folder: Path, encoder: bool) -> Pooling:
    """The base folder's pooling (see the module docstring)."""
    default = Pooling("mean" if encoder else "last", True, "the family's default")
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return default
    try:
        modules = json.loads(modules_file.read_text())
        kinds = {str(m["type"]).rpartition(".")[2]: str(m.get("path", "")) for m in modules}
        if "Pooling" not in kinds:
            return default
        config = json.loads((folder / kinds["Pooling"] / "config.json").read_text())
        modes = [mode for flag, mode in _FLAGS.items() if config.get(flag)]
        if "pooling_mode" in config:  # newer sentence-transformers write the mode by name
            modes = [_by_name(str(config["pooling_mode"]))]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("the base's modules.json could not be read (%s); pooling by the family's default", exc)
        return default
    if len(modes) != 1:
        log.warning("the base's pooling %s is not one mode; pooling by the family's default", modes)
        return default
    return Pooling(modes[0], "Normalize" in kinds, "modules.json")


def _by_name(name: str) -> Mode:
    names: dict[str, Mode] = {"mean": "mean", "cls": "cls", "lasttoken": "last", "max": "max"}
    names |= {"mean_sqrt_len_tokens": "mean_sqrt_len", "weightedmean": "weightedmean"}
    if name not in names:
        raise ValueError(f"pooling mode {name!r}")
    return names[name]

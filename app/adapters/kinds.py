"""The adapter kinds the server serves, and the one entry point that reads any of them."""

from __future__ import annotations

from pathlib import Path

from app.adapters.bottleneck_format import PEFT_TYPE as BOTTLENECK_TYPE
from app.adapters.bottleneck_format import BottleneckAdapter, load_bottleneck
from app.adapters.ia3_format import PEFT_TYPE as IA3_TYPE
from app.adapters.ia3_format import IA3Adapter, load_ia3
from app.adapters.lora_format import LoraAdapter, load_lora, read_config
from app.models.base_lm import BaseSpec

Adapter = LoraAdapter | BottleneckAdapter | IA3Adapter


def load_adapter(folder: Path, spec: BaseSpec, max_rank: int, check_values: bool = True) -> Adapter:
    """Read and validate an adapter folder of any kind (``peft_type`` in its config decides).

    ``max_rank`` bounds LoRA ranks; a bottleneck module is at most the base's hidden size wide."""
    peft_type = read_config(folder).get("peft_type")
    if peft_type == BOTTLENECK_TYPE:
        return load_bottleneck(folder, spec, check_values)
    if peft_type == IA3_TYPE:
        return load_ia3(folder, spec, check_values)
    return load_lora(folder, spec, max_rank, check_values)

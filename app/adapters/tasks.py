"""The tasks an adapter serves, named once: what PEFT's ``task_type`` maps to, and the route of each;
and the kinds of adapters."""

from __future__ import annotations

from typing import Literal

Task = Literal["classify", "generate", "embed"]
AdapterKind = Literal["lora", "dora", "ia3", "bottleneck"]

# PEFT's task_type -> the task (FEATURE_EXTRACTION: sentence embeddings, pooled as the base says)
TASKS: dict[str, Task] = {"SEQ_CLS": "classify", "CAUSAL_LM": "generate", "FEATURE_EXTRACTION": "embed"}
ENDPOINTS: dict[Task, str] = {"classify": "/classify", "generate": "/generate", "embed": "/embed"}

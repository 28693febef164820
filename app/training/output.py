"""Writing a trained adapter's folder: PEFT's files (or the bottleneck modules'), the labels and
the metrics, written beside the target first and moved into place (never half-written)."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import Any

from peft import PeftModel

from app.adapters.lora_format import LABELS_FILE
from app.training.bottleneck_modules import BottleneckModel

METRICS_FILE = "metrics.json"


def save_adapter(
    model: PeftModel | BottleneckModel,
    output: Path,
    model_id: str,
    labels: list[str] | None,
    metrics: dict[str, Any],
) -> None:
    """Write the folder next to ``output`` first, then move it into place (never half-written)."""
    output = output.resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".tmp-{output.name}-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(str(tmp))
        config_path = tmp / "adapter_config.json"  # name the base by its id, not this machine's path
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = model_id
        config_path.write_text(json.dumps(config, indent=2))
        (tmp / "README.md").unlink(missing_ok=True)  # PEFT's model-card template says nothing useful here
        if labels is not None:
            (tmp / LABELS_FILE).write_text(json.dumps(labels))
        (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
        if output.exists():
            shutil.rmtree(output)
        tmp.rename(output)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)

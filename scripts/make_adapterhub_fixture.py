"""Write tests/fixtures/adapterhub-houlsby: a Houlsby bottleneck adapter saved by AdapterHub
`adapters` on the default base, with the library's own outputs on it (the oracle of
tests/integration/test_adapterhub.py).

`adapters` 1.3.0 pins transformers 4.57, so this runs in a separate environment:

    python -m venv /tmp/ahvenv
    /tmp/ahvenv/bin/pip install torch==2.13.0 transformers==4.57.6 adapters==1.3.0
    /tmp/ahvenv/bin/python scripts/make_adapterhub_fixture.py <the converted base folder under
        ~/.cache/adapterserve/models/>
"""

import json
import shutil
import sys
from pathlib import Path

import adapters  # type: ignore[import-not-found]
import torch
from adapters import DoubleSeqBnConfig
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

base = sys.argv[1]
out = Path(__file__).parents[1] / "tests" / "fixtures" / "adapterhub-houlsby"
shutil.rmtree(out, ignore_errors=True)
torch.manual_seed(0)
# the folder states rope_theta in transformers 5's rope_parameters, which 4.57 does not read
model = AutoModelForCausalLM.from_pretrained(base, rope_theta=100000.0)
adapters.init(model)
cfg = DoubleSeqBnConfig(reduction_factor=64, leave_out=list(range(4, 30)), non_linearity="swish", scaling=1.5)
model.add_adapter("support", config=cfg)
with torch.no_grad():
    for n, p in model.named_parameters():
        if "adapters.support" in n:
            p.copy_(torch.randn_like(p) * (0.02 if "adapter_up" in n else 0.005))
model.set_active_adapters("support")
model.eval()
model.save_adapter(str(out), "support", use_safetensors=True, with_head=False)
tok = PreTrainedTokenizerFast(tokenizer_file=f"{base}/tokenizer.json")
prompts = ["The capital of France is", "Customer: my printer does not work.\nAgent:"]
logits, greedy = [], []
with torch.no_grad():
    for p in prompts:
        enc = tok(p, return_tensors="pt", return_token_type_ids=False)
        logits.append(model(**enc).logits[0, -1])
        # without the KV cache: the library's cached decoding diverges from its own forward here
        g = model.generate(**enc, max_new_tokens=8, do_sample=False, use_cache=False)
        greedy.append(g[0, enc.input_ids.shape[1] :].tolist())
save_file({"logits": torch.stack(logits)}, str(out / "reference_logits.safetensors"))
made_with = f"adapters {adapters.__version__}"
(out / "reference.json").write_text(
    json.dumps({"prompts": prompts, "greedy_token_ids": greedy, "made_with": made_with})
)
print(sorted(p.name for p in out.iterdir()), greedy)

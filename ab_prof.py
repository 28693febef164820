import sys, statistics, torch, cProfile, pstats, time
from app.config import Settings
from app.engine.engine import Engine
from app.metrics import Metrics
from app.models.base_lm import load_base_model
from bench.common import PROMPT
from bench.decode_step import step_ms
fmt = sys.argv[1]
s = Settings(quantization=fmt)
base = load_base_model(s.base_model, s.cache_dir, "cpu", "auto", fmt)
engine = Engine(base, s, Metrics())
prompt = list(base.tokenizer(PROMPT)["input_ids"])
print([round(step_ms(engine, prompt, 1, 30), 2) for _ in range(3)])
if len(sys.argv) > 2:
    from torch.profiler import profile
    with profile() as prof:
        step_ms(engine, prompt, 1, 30)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
else:
    pr = cProfile.Profile(); pr.enable(); step_ms(engine, prompt, 1, 60); pr.disable()
    pstats.Stats(pr).sort_stats("tottime").print_stats(30)

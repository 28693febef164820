"""Throughput of mixed-adapter batches: bare base vs this engine vs HF PEFT (mixed batch, swapping).

    python -m bench.throughput [--device auto] [--repeats 6]

Prints one markdown table; every ratio is against the bare base measured in the same run, in the
same process and in turns with the configuration (round r of every configuration before round
r + 1 of any), so that this machine's drift over the minutes of a run weighs on all alike: the
median over the turns of the configuration's rate divided by the base's rate in the same turn.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from transformers import AutoModelForCausalLM

from app.adapters.kinds import load_adapter
from app.config import Settings
from app.engine.engine import Engine
from app.engine.runner import last_non_pad_index
from app.engine.types import SamplingParams
from app.metrics import Metrics
from app.models.base_lm import BaseLM, load_base_model
from app.platform import keep_freed_memory, release_omp_threads
from bench.common import PROMPT, TEXT, make_peft, save_adapters, save_bottlenecks
from tests.helpers.versions import HeldVersion, generation, held

LABELS = ["business", "entertainment", "politics", "sport", "tech"]
COUNTS = [1, 16, 64]
BN_16 = "this engine, 16 bottleneck adapters (Houlsby)"
BARE_ENGINE = "bare base (this engine's process, no adapter)"
BARE_HF = "bare base (HF forward)"
SWAP_16 = "HF PEFT swapping the adapter per request, 16 adapters"
MIXED_KINDS = "this engine, 8 LoRA + 8 bottleneck adapters"
T = TypeVar("T")


@dataclass
class Config:
    """One configuration to measure: ``run(r)`` does round ``r`` and returns the texts or tokens it
    processed; ``warmup`` rounds come first (an engine configuration: until each of its adapters
    has been used once, so that no adapter load falls into a timed round)."""

    run: Callable[[int], int]
    warmup: int = 1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _padded(tok: Any, texts: list[str], side: str, device: torch.device) -> dict[str, torch.Tensor]:
    tok.padding_side = side
    enc = tok(texts, return_tensors="pt", padding=True)
    return {k: v.to(device) for k, v in enc.items()}


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.cache_dir = Settings().cache_dir
        self.base: BaseLM = load_base_model("", self.cache_dir, args.device, args.dtype)
        self.device, self.dtype = self.base.device, self.base.dtype
        self.tok = self.base.tokenizer
        self.texts = [f"{i}. {TEXT}" for i in range(args.batch)]
        if args.part == "hf":
            plain = AutoModelForCausalLM.from_pretrained(self.base.path, dtype=self.dtype)
            self.plain = plain.to(self.device).eval()  # type: ignore[arg-type]
        else:
            settings = Settings(
                max_device_adapters=256,  # every configuration's adapters stay resident: no
                # load inside a timed round, although the configurations run in turns
                max_batch_size=max(args.batch, args.gen_requests),
                max_queue=100_000,
                max_batch_wait_ms=2,
                request_timeout_s=3600,
            )
            self.engine = Engine(self.base, settings, Metrics())
            self.engine.start()

    def sync(self) -> None:
        _sync(self.device)

    # --- one round of each configuration (returns the texts or tokens it processed) --------
    def bare_classify(self, model: Any) -> Config:
        """The backbone forward plus a pooled linear head: what a classification costs without LoRA."""
        enc = _padded(self.tok, self.texts, "right", self.device)
        head = torch.randn(len(LABELS), model.config.hidden_size, device=self.device, dtype=self.dtype)

        @torch.inference_mode()
        def run(r: int) -> int:
            hidden = model.model(**enc).last_hidden_state
            pooled = hidden[
                torch.arange(hidden.shape[0]), last_non_pad_index(enc["input_ids"], self.tok.pad_token_id)
            ]
            torch.softmax((pooled @ head.T).float(), -1).cpu()
            if self.args.part == "engine":  # as every helper thread of the server does
                release_omp_threads()
            return self.args.batch

        return Config(run)

    async def _classify(self, v: HeldVersion, ids: list[int]) -> list[list[float]]:
        return await self.engine.classify(v, [ids], v.weights)

    async def _generate(self, v: HeldVersion | None, prompt: list[int], params: SamplingParams) -> Any:
        return await self.engine.generate(generation(prompt, params, v))

    def engine_classify(self, infos: list[HeldVersion]) -> Config:
        ids = [self.tok(t)["input_ids"] for t in self.texts]
        batch, k = self.args.batch, len(infos)

        async def one_round(r: int) -> int:
            await asyncio.gather(*(self._classify(infos[(r * batch + i) % k], ids[i]) for i in range(batch)))
            return batch

        return Config(lambda r: asyncio.run(one_round(r)), warmup=-(-k // batch))

    def peft_classify(self, peft: Any, k: int, swap: bool) -> Config:
        enc = _padded(self.tok, self.texts, "right", self.device)
        names = [f"a{i % k}" for i in range(self.args.batch)]

        @torch.inference_mode()
        def mixed(r: int) -> int:
            peft(**enc, adapter_names=names).logits.float().softmax(-1).cpu()
            return self.args.batch

        @torch.inference_mode()
        def swapped(r: int) -> int:
            done = 0
            for name in _share(list(dict.fromkeys(names)), r):
                idx = [i for i, n in enumerate(names) if n == name]
                peft.set_adapter(name)
                sub = _padded(self.tok, [self.texts[i] for i in idx], "right", self.device)
                peft(**sub).logits.float().softmax(-1).cpu()
                done += len(idx)
            return done

        return Config(swapped if swap else mixed)

    def engine_generate(self, infos: list[HeldVersion | None]) -> Config:
        prompts = [self.tok(f"{i} {PROMPT}")["input_ids"] for i in range(self.args.gen_requests)]
        n, k = self.args.gen_requests, len(infos)
        params = SamplingParams(max_new_tokens=self.args.new_tokens, ignore_eos=True)

        async def one_round(r: int) -> int:
            results = await asyncio.gather(
                *(self._generate(infos[(r * n + i) % k], prompts[i], params) for i in range(n))
            )
            return sum(len(res.token_ids) for res in results)

        return Config(lambda r: asyncio.run(one_round(r)), warmup=-(-k // n))

    def hf_generate(self, model: Any, names: list[str] | None, swap: bool = False) -> Config:
        prompts = [f"{i} {PROMPT}" for i in range(self.args.gen_requests)]
        new = self.args.new_tokens
        kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=self.tok.pad_token_id)

        @torch.inference_mode()
        def batched(r: int) -> int:
            enc = _padded(self.tok, prompts, "left", self.device)
            extra = {"adapter_names": names} if names else {}
            model.generate(**enc, **kw, **extra)
            return len(prompts) * new

        @torch.inference_mode()
        def swapped(r: int) -> int:
            assert names is not None
            pairs = _share(list(zip(prompts, names, strict=True)), r)
            for prompt, name in pairs:
                model.set_adapter(name)
                model.generate(**_padded(self.tok, [prompt], "left", self.device), **kw)
            return len(pairs) * new

        return Config(swapped if swap else batched)

    # --- driver -----------------------------------------------------------------------------
    def infos(self, folders: list[Path]) -> list[HeldVersion]:
        return [held(f.name, load_adapter(f, self.base.spec, 64)) for f in folders]

    def run_engine(self, out: Path) -> dict[str, dict[str, list[float]]]:
        """This engine, and the bare base on the same (wrapped, adapter-free) model, in turns."""
        cls_infos = self.infos(sorted((out / "cls-store").iterdir(), key=_index))
        gen_infos = self.infos(sorted((out / "gen-store").iterdir(), key=_index))
        hidden, layers = self.base.spec.hidden_size, self.base.model.config.num_hidden_layers
        bn_cls = self.infos(save_bottlenecks(out / "bn-cls", 16, hidden, layers, "classify", LABELS))
        bn_gen = self.infos(save_bottlenecks(out / "bn-gen", 16, hidden, layers, "generate"))
        mixed_cls = [x for p in zip(cls_infos[:8], bn_cls[:8], strict=True) for x in p]
        mixed_gen = [x for p in zip(gen_infos[:8], bn_gen[:8], strict=True) for x in p]
        cls_configs = {BARE_ENGINE: self.bare_classify(self.base.model)}  # the engine is idle meanwhile
        gen_configs = {BARE_ENGINE: self.engine_generate([None])}
        for k in COUNTS:
            name = f"this engine, {k} adapter{'s' if k > 1 else ''}"
            cls_configs[name] = self.engine_classify(cls_infos[:k])
            gen_configs[name] = self.engine_generate(list(gen_infos[:k]))
        cls_configs[BN_16] = self.engine_classify(bn_cls)
        gen_configs[BN_16] = self.engine_generate(list(bn_gen))
        cls_configs[MIXED_KINDS] = self.engine_classify(mixed_cls)
        gen_configs[MIXED_KINDS] = self.engine_generate(list(mixed_gen))
        result = {
            "classify": in_turns(cls_configs, self.args.repeats, self.sync),
            "generate": in_turns(gen_configs, self.args.repeats, self.sync),
        }
        self.engine.stop()
        return result

    def run_hf(self, out: Path) -> dict[str, dict[str, list[float]]]:
        """The bare base and HF PEFT, on the main thread of their own process, in turns."""
        a = self.args
        n = max(COUNTS)
        peft_cls = make_peft(self.base.path, "classify", n, a.rank, self.dtype, self.device)
        if not (out / "cls-store").exists():
            save_adapters(peft_cls, out / "cls", n, LABELS)
        cls_configs = {BARE_HF: self.bare_classify(self.plain)}
        for k in (16, 64):
            cls_configs[f"HF PEFT mixed batch, {k} adapters"] = self.peft_classify(peft_cls, k, swap=False)
        cls_configs[SWAP_16] = self.peft_classify(peft_cls, 16, swap=True)
        cls = in_turns(cls_configs, a.repeats, self.sync)
        del peft_cls, cls_configs
        peft_gen = make_peft(self.base.path, "generate", n, a.rank, self.dtype, self.device)
        if not (out / "gen-store").exists():
            save_adapters(peft_gen, out / "gen", n)
        gen_configs = {"bare base (HF generate)": self.hf_generate(self.plain, None)}
        for k in (16, 64):
            names = [f"a{i % k}" for i in range(a.gen_requests)]
            gen_configs[f"HF PEFT mixed batch, {k} adapters"] = self.hf_generate(peft_gen, names)
        gen_configs[SWAP_16] = self.hf_generate(peft_gen, [f"a{i % 16}" for i in range(a.gen_requests)], True)
        return {"classify": cls, "generate": in_turns(gen_configs, a.repeats, self.sync)}


def in_turns(configs: dict[str, Config], repeats: int, sync: Callable[[], None]) -> dict[str, list[float]]:
    """Texts or tokens per second of each configuration in each of ``repeats`` turns. In a turn every
    configuration runs one timed round, starting with a different one each turn, so that the
    machine's drift over the minutes a run takes weighs on all of them alike."""
    rates: dict[str, list[float]] = {name: [] for name in configs}
    for config in configs.values():
        for r in range(config.warmup):
            config.run(r)
    names = list(configs)
    for i in range(repeats):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            config = configs[name]
            sync()
            start = time.perf_counter()
            items = config.run(config.warmup + i)
            sync()
            rates[name].append(items / (time.perf_counter() - start))
    return rates


def _share(items: list[T], r: int, parts: int = 4) -> list[T]:
    """The ``r``-th of ``parts`` equal shares of ``items``, in rotation. Swapping runs one adapter's
    requests after another's, so its rate does not depend on how many run in a round: a share keeps
    its slow rounds about as long as the other configurations' rounds."""
    size = -(-len(items) // parts)
    start = (r % parts) * size
    return items[start : start + size]


def _index(path: Path) -> int:
    return int(path.name[1:])


def print_table(hf: dict[str, dict[str, list[float]]], engine: dict[str, dict[str, list[float]]]) -> None:
    """One row per configuration: its median rate over the turns, and the median over the turns of
    its rate against the bare base in the same turn (the engine's rows: the same model without
    adapters; HF PEFT's rows: the plain HF model), with the lowest and highest of those ratios."""
    bases = {"classify": (BARE_ENGINE, BARE_HF), "generate": (BARE_ENGINE, "bare base (HF generate)")}
    ratio = "vs base (turns: min-max)"
    print(f"\n| configuration | classify texts/s | {ratio} | generate tokens/s | {ratio} |")
    print("|---|---:|---:|---:|---:|")
    for part, figures in (("engine", engine), ("hf", hf)):
        names = dict.fromkeys([*figures["classify"], *figures["generate"]])
        for name in names:
            cells = []
            for task in ("classify", "generate"):
                rates = figures[task]
                if name not in rates:
                    cells.append("– | –")
                    continue
                base = rates[bases[task][0 if part == "engine" else 1]]
                ratios = [x / b for x, b in zip(rates[name], base, strict=True)]
                spread = f"{min(ratios):.2f}-{max(ratios):.2f}"
                rate = statistics.median(rates[name])
                cells.append(f"{rate:.1f} | {statistics.median(ratios):.2f}x ({spread})")
            print(f"| {name} | {' | '.join(cells)} |")
    hf_gen = statistics.median(hf["generate"]["bare base (HF generate)"])
    engine_gen = statistics.median(engine["generate"][BARE_ENGINE])
    print(f"\nHF generate against this engine without adapters (two processes): {hf_gen / engine_gen:.2f}x")


def _part(args: argparse.Namespace, part: str, out: Path) -> dict[str, dict[str, list[float]]]:
    """Run one part in a fresh process: two threads computing in one process slow each other down."""
    cmd = [sys.executable, "-m", "bench.throughput", "--part", part, "--out", str(out)]
    for key in ("device", "dtype", "rank", "batch", "gen_requests", "new_tokens", "repeats"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=32, help="classification rows per batch")
    parser.add_argument("--gen-requests", type=int, default=16, help="concurrent generation requests")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=6, help="turns (timed rounds per configuration)")
    parser.add_argument("--part", choices=["hf", "engine"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.manual_seed(0)
    keep_freed_memory()  # for the baselines as well as the engine (as `adapterserve serve` does)
    if args.part:
        bench = Bench(args)
        result = bench.run_hf(args.out) if args.part == "hf" else bench.run_engine(args.out)
        print(json.dumps(result))
        return
    out = Path(tempfile.mkdtemp(prefix="adapterserve-bench-"))
    print(
        f"device={args.device} dtype={args.dtype} rank={args.rank} classify batch={args.batch} "
        f"generate requests={args.gen_requests} x {args.new_tokens} tokens, repeats={args.repeats}",
        flush=True,
    )
    try:
        hf = _part(args, "hf", out)  # also writes the adapters the engine loads
        engine = _part(args, "engine", out)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    print_table(hf, engine)


if __name__ == "__main__":
    main()

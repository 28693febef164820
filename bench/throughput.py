"""Throughput of mixed-adapter batches: bare base vs this engine vs HF PEFT (mixed batch, swapping).

    python -m bench.throughput [--device auto] [--repeats 3]

Prints one markdown table; every ratio is against the bare base measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from app.adapters.kinds import load_adapter
from app.adapters.registry import AdapterInfo
from app.config import Settings
from app.engine.engine import Engine
from app.engine.runner import last_non_pad_index
from app.engine.types import SamplingParams
from app.memory import keep_freed_memory
from app.metrics import Metrics
from app.models.base import BaseModel, load_base_model
from bench.common import PROMPT, TEXT, make_peft, save_adapters, save_bottlenecks, timed

LABELS = ["business", "entertainment", "politics", "sport", "tech"]
COUNTS = [1, 16, 64]
BN_16 = "this engine, 16 bottleneck adapters (Houlsby)"
MIXED_KINDS = "this engine, 8 LoRA + 8 bottleneck adapters"


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
        self.base: BaseModel = load_base_model("", self.cache_dir, args.device, args.dtype)
        self.device, self.dtype = self.base.device, self.base.dtype
        self.tok = self.base.tokenizer
        self.texts = [f"{i}. {TEXT}" for i in range(args.batch)]
        if args.part == "hf":
            plain = AutoModelForCausalLM.from_pretrained(self.base.path, dtype=self.dtype)
            self.plain = plain.to(self.device).eval()  # type: ignore[arg-type]
        else:
            settings = Settings(
                max_device_adapters=64,
                max_batch_size=max(args.batch, args.gen_requests),
                max_queue=100_000,
                max_batch_wait_ms=2,
                request_timeout_s=3600,
            )
            self.engine = Engine(self.base, settings, Metrics())
            self.engine.start()

    def sync(self) -> None:
        _sync(self.device)

    # --- classification ---------------------------------------------------------------------
    def bare_classify(self) -> float:
        enc = _padded(self.tok, self.texts, "right", self.device)
        head = torch.randn(len(LABELS), self.plain.config.hidden_size, device=self.device, dtype=self.dtype)

        @torch.inference_mode()
        def run() -> None:
            hidden = self.plain.model(**enc).last_hidden_state
            pooled = hidden[
                torch.arange(hidden.shape[0]), last_non_pad_index(enc["input_ids"], self.tok.pad_token_id)
            ]
            torch.softmax((pooled @ head.T).float(), -1).cpu()

        return self.args.batch * self.args.repeats / timed(run, self.args.repeats, self.sync)

    def engine_classify(self, infos: list[AdapterInfo]) -> float:
        ids = [self.tok(t)["input_ids"] for t in self.texts]
        batch, k = self.args.batch, len(infos)

        async def one_round(r: int) -> None:
            await asyncio.gather(
                *(self.engine.classify(infos[(r * batch + i) % k], [ids[i]]) for i in range(batch))
            )

        asyncio.run(one_round(0))  # warm-up: adapters resident
        asyncio.run(one_round(1))
        start = time.perf_counter()
        for r in range(self.args.repeats):
            asyncio.run(one_round(r))
        return batch * self.args.repeats / (time.perf_counter() - start)

    def peft_classify(self, peft: Any, k: int, swap: bool) -> float:
        enc = _padded(self.tok, self.texts, "right", self.device)
        names = [f"a{i % k}" for i in range(self.args.batch)]

        @torch.inference_mode()
        def mixed() -> None:
            peft(**enc, adapter_names=names).logits.float().softmax(-1).cpu()

        @torch.inference_mode()
        def swapped() -> None:
            for name in dict.fromkeys(names):
                idx = [i for i, n in enumerate(names) if n == name]
                peft.set_adapter(name)
                sub = _padded(self.tok, [self.texts[i] for i in idx], "right", self.device)
                peft(**sub).logits.float().softmax(-1).cpu()

        return (
            self.args.batch
            * self.args.repeats
            / timed(swapped if swap else mixed, self.args.repeats, self.sync)
        )

    # --- generation -------------------------------------------------------------------------
    def _gen_params(self) -> SamplingParams:
        return SamplingParams(max_new_tokens=self.args.new_tokens, ignore_eos=True)

    def engine_generate(self, infos: list[AdapterInfo | None]) -> float:
        prompts = [self.tok(f"{i} {PROMPT}")["input_ids"] for i in range(self.args.gen_requests)]
        n, k = self.args.gen_requests, len(infos)

        async def one_round(r: int) -> int:
            results = await asyncio.gather(
                *(
                    self.engine.generate(infos[(r * n + i) % k], prompts[i], self._gen_params())
                    for i in range(n)
                )
            )
            return sum(len(res.token_ids) for res in results)

        asyncio.run(one_round(0))
        start = time.perf_counter()
        tokens = sum(asyncio.run(one_round(r)) for r in range(self.args.repeats))
        return tokens / (time.perf_counter() - start)

    def hf_generate(self, model: Any, names: list[str] | None, swap: bool = False) -> float:
        prompts = [f"{i} {PROMPT}" for i in range(self.args.gen_requests)]
        new = self.args.new_tokens
        kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=self.tok.pad_token_id)

        @torch.inference_mode()
        def batched() -> None:
            enc = _padded(self.tok, prompts, "left", self.device)
            extra = {"adapter_names": names} if names else {}
            model.generate(**enc, **kw, **extra)

        @torch.inference_mode()
        def swapped() -> None:
            assert names is not None
            for prompt, name in zip(prompts, names, strict=True):
                model.set_adapter(name)
                model.generate(**_padded(self.tok, [prompt], "left", self.device), **kw)

        fn = swapped if swap else batched
        return len(prompts) * new * self.args.repeats / timed(fn, self.args.repeats, self.sync)

    # --- driver -----------------------------------------------------------------------------
    def infos(self, folders: list[Path]) -> list[AdapterInfo]:
        return [AdapterInfo.from_adapter(f.name, load_adapter(f, self.base.spec, 64)) for f in folders]

    def run_engine(self, out: Path) -> dict[str, dict[str, float]]:
        """This engine only (its thread is the only one computing in this process)."""
        cls_infos = self.infos(sorted((out / "cls-store").iterdir(), key=_index))
        gen_infos = self.infos(sorted((out / "gen-store").iterdir(), key=_index))
        cls: dict[str, float] = {}
        gen: dict[str, float] = {"bare base (this engine, no adapter)": self.engine_generate([None])}
        for k in COUNTS:
            cls[f"this engine, {k} adapters"] = self.engine_classify(cls_infos[:k])
            gen[f"this engine, {k} adapters"] = self.engine_generate(list(gen_infos[:k]))
        # bottleneck adapters (Houlsby, reduction 16), alone and mixed with LoRA in every batch
        hidden, layers = self.base.spec.hidden_size, self.base.model.config.num_hidden_layers
        bn_cls = self.infos(save_bottlenecks(out / "bn-cls", 16, hidden, layers, "classify", LABELS))
        bn_gen = self.infos(save_bottlenecks(out / "bn-gen", 16, hidden, layers, "generate"))
        cls[BN_16] = self.engine_classify(bn_cls)
        gen[BN_16] = self.engine_generate(list(bn_gen))
        cls[MIXED_KINDS] = self.engine_classify(
            [x for p in zip(cls_infos[:8], bn_cls[:8], strict=True) for x in p]
        )
        gen[MIXED_KINDS] = self.engine_generate(
            [x for p in zip(gen_infos[:8], bn_gen[:8], strict=True) for x in p]
        )
        self.engine.stop()
        return {"classify": cls, "generate": gen}

    def run_hf(self, out: Path) -> dict[str, dict[str, float]]:
        """The bare base and HF PEFT, on the main thread of their own process."""
        a = self.args
        n = max(COUNTS)
        cls: dict[str, float] = {"bare base (HF forward)": self.bare_classify()}
        gen: dict[str, float] = {"bare base (HF generate)": self.hf_generate(self.plain, None)}
        peft_cls = make_peft(self.base.path, "classify", n, a.rank, self.dtype, self.device)
        if not (out / "cls-store").exists():
            save_adapters(peft_cls, out / "cls", n, LABELS)
        for k in (16, 64):
            cls[f"HF PEFT mixed batch, {k} adapters"] = self.peft_classify(peft_cls, k, swap=False)
        cls["HF PEFT swapping per request, 16 adapters"] = self.peft_classify(peft_cls, 16, swap=True)
        del peft_cls
        peft_gen = make_peft(self.base.path, "generate", n, a.rank, self.dtype, self.device)
        if not (out / "gen-store").exists():
            save_adapters(peft_gen, out / "gen", n)
        for k in (16, 64):
            names = [f"a{i % k}" for i in range(a.gen_requests)]
            gen[f"HF PEFT mixed batch, {k} adapters"] = self.hf_generate(peft_gen, names)
        gen["HF PEFT swapping per request, 16 adapters"] = self.hf_generate(
            peft_gen, [f"a{i % 16}" for i in range(a.gen_requests)], swap=True
        )
        return {"classify": cls, "generate": gen}


def _index(path: Path) -> int:
    return int(path.name[1:])


def print_table(cls: dict[str, float], gen: dict[str, float]) -> None:
    cls_base = cls["bare base (HF forward)"]
    gen_base = max(gen["bare base (HF generate)"], gen["bare base (this engine, no adapter)"])
    print("\n| configuration | classify texts/s | vs base | generate tokens/s | vs base |")
    print("|---|---:|---:|---:|---:|")
    for name in dict.fromkeys([*cls, *gen]):
        c = f"{cls[name]:.1f} | {cls[name] / cls_base:.2f}x" if name in cls else "– | –"
        g = f"{gen[name]:.1f} | {gen[name] / gen_base:.2f}x" if name in gen else "– | –"
        print(f"| {name} | {c} | {g} |")
    print("\n(generation ratios are against the faster of the two bare-base measurements)")


def _part(args: argparse.Namespace, part: str, out: Path) -> dict[str, dict[str, float]]:
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
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--part", choices=["hf", "engine"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.manual_seed(0)
    keep_freed_memory()  # for the baselines as well as the engine (which sets it itself)
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
    print_table({**hf["classify"], **engine["classify"]}, {**hf["generate"], **engine["generate"]})


if __name__ == "__main__":
    main()

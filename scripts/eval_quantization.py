"""What quantizing the base costs in quality: the demo adapters served by a server at each of
ADAPTERSERVE_QUANTIZATION none / bf16 / int8 / int4 / w8a8, one server process after the other, on
a copy of the demo store (plus any extra adapter folders, e.g. ones retrained with ``--quantization int4``).

    python scripts/eval_quantization.py [--extra build/chat-topic-int4 ...] [--prompts 50]

Prints markdown tables: held-out accuracy and macro-F1 of each classifier (the trainer's held-out
split of its data); greedy agreement of the bare base and of ``support-bot`` with the unquantized
server over ``--prompts`` prompts (the share of identical outputs); and
a few of the support bot's answers side by side. Needs ``make demo-data`` (the ``data/`` files).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import httpx

from bench.server import running_server
from scripts.eval_classifier import macro_f1

CLASSIFIERS = {  # adapter -> its data (held out as the trainer did: 20 %, seed 0) and --max-length
    "bbc-topic": ("data/bbc-news.csv", 64),
    "chat-topic": ("data/chat-topic.csv", 48),
    "chat-topic-bottleneck": ("data/chat-topic.csv", 48),
}
KINDS = ("none", "bf16", "int8", "int4", "w8a8")
TOKENS = 32


def _held_out(path: str, max_length: int) -> tuple[list[str], list[str]]:
    """The held-out texts cut to the trainer's ``--max-length`` tokens (as it saw them)."""
    from transformers import AutoTokenizer

    from app.config import Settings
    from app.models.sources import resolve_model_path
    from app.training.data import classify_examples, stratified_split

    settings = Settings()
    tok = AutoTokenizer.from_pretrained(resolve_model_path(settings.base_model, settings.cache_dir)[0])
    held = stratified_split(classify_examples(Path(path), "text", "label"), 0.2, seed=0)[1]
    texts = [tok.decode(tok(t)["input_ids"][:max_length]) for t in held.texts]
    return texts, held.labels


def _classify(http: httpx.Client, adapter: str, texts: list[str]) -> list[str]:
    pred: list[str] = []
    for i in range(0, len(texts), 32):
        resp = http.post("/classify", json={"adapter": adapter, "inputs": texts[i : i + 32]})
        resp.raise_for_status()
        pred += [r["label"] for r in resp.json()["results"]]
    return pred


def _generate(http: httpx.Client, adapter: str | None, prompt: str) -> str:
    body = {"adapter": adapter, "messages": [{"role": "user", "content": prompt}], "max_new_tokens": TOKENS}
    resp = http.post("/generate", json=body)
    resp.raise_for_status()
    return str(resp.json()["text"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--extra", type=Path, nargs="*", default=[], help="more adapter folders to evaluate")
    parser.add_argument("--prompts", type=int, default=50, help="0: classifiers only")
    parser.add_argument("--only", nargs="*", default=None, help="score only these classifiers")
    parser.add_argument(
        "--kinds",
        nargs="+",
        default=list(KINDS),
        help="quantizations (none always runs; int4+lora4: with 4-bit LoRA weights)",
    )
    args = parser.parse_args()
    kinds = ["none", *(k for k in args.kinds if k != "none")]
    store = Path(tempfile.mkdtemp(prefix="adapterserve-quality-"))
    classifiers = dict(CLASSIFIERS)
    for folder in [*Path("adapters_store").iterdir(), *args.extra]:
        if (folder / "adapter_config.json").is_file():
            shutil.copytree(folder, store / folder.name, ignore=shutil.ignore_patterns("adapterserve.json"))
    for folder in args.extra:  # retrained copies of a demo classifier: same data as their original
        origin = next((c for c in CLASSIFIERS if folder.name.startswith(c)), None)
        if origin is not None:
            classifiers[folder.name] = CLASSIFIERS[origin]
    if args.only is not None:
        classifiers = {k: v for k, v in classifiers.items() if k in args.only}
    held = {name: _held_out(*data) for name, data in classifiers.items()}
    lines = [json.loads(x) for x in Path("data/support.jsonl").read_text().splitlines() if x.strip()]
    prompts = [x["prompt"] for x in lines][: args.prompts]
    scores: dict[str, dict[str, tuple[float, float]]] = {}
    texts: dict[str, dict[str, dict[str, str]]] = {}
    try:
        for kind in kinds:
            log = store / f"server-{kind}.log"
            quantization, _, lora = kind.partition("+lora")  # int4+lora4: 4-bit LoRA weights
            with (
                running_server(store, log, quantization=quantization, lora_bits=lora or "8") as (_, url),
                httpx.Client(base_url=url, timeout=600) as http,
            ):
                for name, (xs, gold) in held.items():
                    pred = _classify(http, name, xs)
                    acc = sum(p == g for p, g in zip(pred, gold, strict=True)) / len(gold)
                    scores.setdefault(name, {})[kind] = (acc, macro_f1(pred, gold, sorted(set(gold))))
                for adapter in (None, "support-bot") if prompts else ():
                    key = adapter or "bare base"
                    texts.setdefault(key, {})[kind] = {p: _generate(http, adapter, p) for p in prompts}
    finally:
        shutil.rmtree(store, ignore_errors=True)
    print("\n| classifier (held out) | " + " | ".join(f"{k}: accuracy, macro-F1" for k in kinds) + " |")
    print("|---|" + "---:|" * len(kinds))
    for name, row in scores.items():
        print(
            f"| `{name}` ({len(held[name][1])}) | "
            + " | ".join(f"{a:.3f}, {f:.3f}" for a, f in row.values())
            + " |"
        )
    if not prompts:
        return
    others = kinds[1:]
    print(f"\n| greedy, {len(prompts)} prompts × {TOKENS} tokens | " + " | ".join(others) + " |")
    print("|---|" + "---:|" * len(others))
    for key, by_kind in texts.items():
        same = [sum(by_kind[k][p] == by_kind["none"][p] for p in prompts) / len(prompts) for k in others]
        print(f"| {key}: identical to none | " + " | ".join(f"{x:.2f}" for x in same) + " |")
    print("\n| prompt | " + " | ".join(f"support-bot, {k}" for k in kinds) + " |")
    print("|---|" + "---|" * len(kinds))
    for p in prompts[:5]:
        print(f"| {p} | " + " | ".join(texts["support-bot"][k][p].replace("|", "/") for k in kinds) + " |")


if __name__ == "__main__":
    main()

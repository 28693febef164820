"""The engine part of the throughput bench for two checkouts of this repository, in turns.

    python -m bench.compare_revisions BEFORE_DIR AFTER_DIR [--runs 2] [--repeats 4]

Both checkouts measure the same adapters (written once here): the engine part of
``bench.throughput`` runs in a fresh process of each checkout, alternating (before, after, before,
after...), so that this machine's drift weighs on both alike. Prints one table: per configuration
the median ratio to the bare base of its own process over every turn of every run, for each
checkout, with the lowest and highest per-turn ratio.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from app.config import Settings
from app.models.base_lm import resolve_model_path
from bench.common import machine_line, make_peft, save_adapters
from bench.throughput import BARE_ENGINE, COUNTS, LABELS

Figures = dict[str, dict[str, list[float]]]  # task -> configuration -> rates per turn


def _write_adapters(out: Path, rank: int) -> None:
    path, _ = resolve_model_path("", Settings().cache_dir)
    n = max(COUNTS)
    for task, labels in (("classify", LABELS), ("generate", None)):
        peft = make_peft(path, task, n, rank, torch.float32, torch.device("cpu"))
        save_adapters(peft, out / ("cls" if task == "classify" else "gen"), n, labels)
        del peft


def _engine_part(checkout: Path, out: Path, args: argparse.Namespace) -> Figures:
    cmd = [sys.executable, "-m", "bench.throughput", "--part", "engine", "--out", str(out)]
    cmd += ["--device", "cpu", "--repeats", str(args.repeats)]
    proc = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=checkout)
    figures: Figures = json.loads(proc.stdout.strip().splitlines()[-1])
    return figures


def _ratios(runs: list[Figures], task: str, name: str) -> list[float]:
    return [x / b for r in runs for x, b in zip(r[task][name], r[task][BARE_ENGINE], strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--runs", type=int, default=2, help="engine parts per checkout")
    parser.add_argument("--repeats", type=int, default=4, help="turns within each engine part")
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="adapterserve-compare-"))
    try:
        _write_adapters(out, args.rank)
        results: dict[str, list[Figures]] = {"before": [], "after": []}
        for i in range(args.runs):
            for label in ("before", "after") if i % 2 == 0 else ("after", "before"):
                results[label].append(_engine_part(getattr(args, label), out, args))
                print(f"run {i + 1}: {label} done", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    print(f"\n{args.runs} engine runs per checkout x {args.repeats} turns, rank {args.rank}, cpu")
    print(machine_line())
    print(f"before: {args.before}\nafter:  {args.after}\n")
    vs = "vs base (min-max)"
    print(f"| task | configuration | before: rate | before: {vs} | after: rate | after: {vs} |")
    print("|---|---|---:|---:|---:|---:|")
    for task in ("classify", "generate"):
        for name in results["after"][0][task]:
            cells = []
            for label in ("before", "after"):
                runs = results[label]
                rate = statistics.median([x for r in runs for x in r[task][name]])
                ratios = _ratios(runs, task, name)
                cells.append(
                    f"{rate:.1f} | {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"
                )
            print(f"| {task} | {name} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()

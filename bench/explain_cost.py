"""What an explanation costs: an explained /classify (integrated gradients at ``--steps`` points;
gradient × input) against a plain one of the same input, and the latency of plain requests while
explanations run, in turns.

    python -m bench.explain_cost [--adapter bbc-topic] [--turns 5] [--quantization auto]

One server on the demo store. Per turn: ``--repeats`` plain requests alone, one explained request of
each method alone, then ``--repeats`` plain requests (another text each time) sent one after the
other while ``--background`` integrated-gradients requests run; medians over the turns.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time

import httpx

from bench.common import TEXT, machine_line
from bench.server import running_server


def timed(http: httpx.Client, body: dict[str, object]) -> float:
    start = time.perf_counter()
    http.post("/classify", json=body).raise_for_status()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--adapter", default="bbc-topic")
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--background", type=int, default=2)
    parser.add_argument("--quantization", default="auto")
    args = parser.parse_args()
    plain = {"adapter": args.adapter, "inputs": TEXT}
    ig = plain | {"explain": {"method": "integrated_gradients", "steps": args.steps}}
    gxi = plain | {"explain": {"method": "gradient_x_input"}}
    times: dict[str, list[float]] = {"plain": [], "ig": [], "gxi": [], "plain during": []}
    with running_server("adapters_store", quantization=args.quantization) as (_, url):
        http = httpx.Client(base_url=url, timeout=600)
        readyz = http.get("/readyz").json()
        timed(http, ig)  # warm-up
        for turn in range(args.turns):
            times["plain"] += [timed(http, plain | {"inputs": f"{i}. {TEXT}"}) for i in range(args.repeats)]
            times["ig"].append(timed(http, ig))
            times["gxi"].append(timed(http, gxi))
            stop = threading.Event()

            def explaining(stop: threading.Event = stop) -> None:
                with httpx.Client(base_url=url, timeout=600) as own:
                    while not stop.is_set():
                        timed(own, ig)

            threads = [threading.Thread(target=explaining) for _ in range(args.background)]
            for t in threads:
                t.start()
            time.sleep(0.5)
            times["plain during"] += [
                timed(http, plain | {"inputs": f"{i}! {TEXT}"}) for i in range(args.repeats)
            ]
            stop.set()
            for t in threads:
                t.join()
            print(f"turn {turn + 1} done", file=sys.stderr, flush=True)
    ms = {k: statistics.median(v) * 1000 for k, v in times.items()}
    p95 = sorted(times["plain during"])[int(0.95 * (len(times["plain during"]) - 1))] * 1000
    print(machine_line())
    print(
        f"`{args.adapter}`, one ~50-token text, quantization {readyz.get('quantization')}; medians over "
        f"{args.turns} turns\n"
    )
    print("| request | latency | vs plain |")
    print("|---|---:|---:|")
    print(f"| plain /classify | {ms['plain']:.0f} ms | 1.0x |")
    name = f"explained, integrated gradients, {args.steps} points"
    print(f"| {name} | {ms['ig']:.0f} ms | {ms['ig'] / ms['plain']:.1f}x |")
    print(f"| explained, gradient × input | {ms['gxi']:.0f} ms | {ms['gxi'] / ms['plain']:.1f}x |")
    print(
        f"| plain, while {args.background} explained requests run (p50; p95 {p95:.0f} ms) | "
        f"{ms['plain during']:.0f} ms | {ms['plain during'] / ms['plain']:.1f}x |"
    )


if __name__ == "__main__":
    main()

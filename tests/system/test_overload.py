"""Overload through real HTTP (bench/overload.py, bounded): at three times the measured saturation
rate nothing fails with 500, the excess is answered 503 with Retry-After, and the server's memory
ends the second round where it ended the first. (Three, not two: the short closed-loop estimate of
saturation came out at half the open loop's goodput on a noisy run, and twice it then shed nothing.)"""

from __future__ import annotations

from bench.overload import parser, run


def test_three_times_the_saturation_rate_is_shed_with_503_and_memory_is_stable() -> None:
    args = parser().parse_args(
        [
            "--saturation-seconds", "20",
            "--factor", "3",
            "--concurrency", "16",
            "--requests", "60",
            "--max-seconds", "10",
            "--rounds", "2",
            "--max-queue", "8",
            "--adapters", "2",
            "--device", "cpu",
        ]
    )  # fmt: skip
    report = run(args)
    report.print()
    tally = report.tally
    assert not tally.errors, tally.errors  # no 500s, no dropped connections
    assert set(tally.statuses) <= {200, 503}, tally.statuses
    assert tally.statuses[503] > 0 and tally.missing_retry_after == 0
    assert tally.ok > 0 and len(tally.latencies) == tally.ok
    first, second = report.rss[1], report.rss[2]
    assert second - first < 0.25 * first, f"RSS grew from {first >> 20} to {second >> 20} MiB"

"""What the gateway hop costs: C concurrent streams straight to an upstream deepserve, and the same streams
through a deepserve gateway in front of it (`--config` with one upstream-served model), rounds interleaved,
one run. Reports output tokens per second and time to first token, medians over rounds.

    .venv/bin/python benchmarks/bench_gateway.py                       # 3 rounds, 8 streams, 64 tokens
    .venv/bin/python benchmarks/bench_gateway.py --rounds 5 --streams 8 --max-tokens 128

All on 127.0.0.1 and the bundled model. By default (`--cores shared`) every process may use every core, so
on a small machine the gateway's own CPU competes with the upstream's decoding: an upper bound of the hop's
cost. `--cores split` pins the upstream (with one llama.cpp thread per core it gets) to the first half of
the cores and the gateway and the load generator to the rest, as in a real deployment where the engines run
on GPUs elsewhere and the gateway's CPU is its own; the direct path is measured under the same pinning.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench import http_run, pct  # noqa: E402
from tests.server import start_server  # noqa: E402

UPSTREAM_MODEL = "SmolLM2-135M-Instruct"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--cores", choices=["shared", "split"], default="shared")
    args = parser.parse_args()

    cores = sorted(os.sched_getaffinity(0))
    upstream_cores, gateway_cores = (cores[: len(cores) // 2], cores[len(cores) // 2:]) if args.cores == "split" else (cores, cores)
    if not upstream_cores:
        parser.error("--cores split needs at least 2 cores")
    # Children inherit this process's CPU affinity when they start: set it before each start.
    os.sched_setaffinity(0, upstream_cores)
    upstream = start_server("--no-auth", "--parallel", str(args.streams), "--ctx-size", "1024", api_key=None,
                            threads=len(upstream_cores))
    os.sched_setaffinity(0, gateway_cores)
    print(f"cores: upstream {upstream_cores}, gateway and load generator {gateway_cores}", flush=True)
    gateway = None
    try:
        config = Path(tempfile.mkdtemp()) / "models.yaml"
        config.write_text(json.dumps({"models": [{
            "id": "via-gateway", "upstream_model": UPSTREAM_MODEL, "context_window": 1024,
            "upstreams": [{"url": upstream.base_url}]}]}))
        gateway = start_server("--no-auth", "--config", str(config), api_key=None)
        peers = {"direct": (upstream.root_url, UPSTREAM_MODEL), "gateway": (gateway.root_url, "via-gateway")}
        asyncio.run(http_run(upstream.root_url, UPSTREAM_MODEL, 2, 8))  # warm-up
        results: dict[str, list] = {name: [] for name in peers}
        for round_index in range(args.rounds):
            order = list(peers) if round_index % 2 == 0 else list(reversed(peers))
            for name in order:
                url, model = peers[name]
                result = asyncio.run(http_run(url, model, args.streams, args.max_tokens))
                results[name].append(result)
                print(f"round {round_index + 1} {name:8s} {result.tok_per_s:7.1f} tok/s  "
                      f"ttft p50 {pct(result.ttft_s, 50) * 1000:7.1f} ms  tokens {result.num_tokens}  "
                      f"failed streams {result.num_failed_streams}", flush=True)
    finally:
        if gateway is not None:
            gateway.stop()
        upstream.stop()
    summary = {}
    for name, runs in results.items():
        summary[name] = (statistics.median(r.tok_per_s for r in runs),
                         statistics.median(pct(r.ttft_s, 50) for r in runs),
                         statistics.median(pct(r.itl_s, 50) for r in runs))
    print(f"\n{args.streams} streams x {args.max_tokens} tokens, medians of {args.rounds} rounds, --cores {args.cores}")
    print("| path | output tok/s | TTFT p50 | ITL p50 |\n| --- | ---: | ---: | ---: |")
    for name, (tps, ttft, itl) in summary.items():
        print(f"| {name} | {tps:.1f} | {ttft * 1000:.1f} ms | {itl * 1000:.1f} ms |")
    (d_tps, d_ttft, _), (g_tps, g_ttft, _) = summary["direct"], summary["gateway"]
    print(f"\ngateway / direct throughput: {g_tps / d_tps:.3f}; TTFT added by the hop: {(g_ttft - d_ttft) * 1000:+.1f} ms")


if __name__ == "__main__":
    main()

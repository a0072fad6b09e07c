"""What the gateway hop costs: requests straight to an upstream deepserve, and the same requests through a
deepserve gateway in front of it (`--config` with one upstream-served model), interleaved, one run.

Two measurements:
- latency: single streamed requests one after another (no batching, nothing queued), alternating direct and
  gateway; the difference of their time-to-first-token medians is what the hop adds to a request;
- load: C concurrent streams per round, rounds interleaved; output tokens per second and TTFT p50 per path.
  With C > 1 a request's TTFT also depends on which engine step admits it (a few ms of arrival spread can
  move it to the next step, ~100 ms here), so the latency phase is the measure of the hop's TTFT cost.

    .venv/bin/python benchmarks/bench_gateway.py                  # 50 sequential requests; 3 rounds of 8 streams x 64 tokens
    .venv/bin/python benchmarks/bench_gateway.py --rounds 5 --streams 8 --max-tokens 128 --requests 100

All on 127.0.0.1 and the bundled model. By default (`--cores shared`) every process may use every core, so
on a small machine the gateway's own CPU competes with the upstream's decoding: an upper bound of the hop's
cost. `--cores split` gives the gateway the second half of the cores to itself and pins the upstream (one
llama.cpp thread per core it gets) and the load generator to the first half, as when the engines run on
GPUs elsewhere: the load generator's CPU then weighs on both paths alike.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench import EOS_BANS, PROMPT, http_run, pct  # noqa: E402
from tests.server import start_server  # noqa: E402

UPSTREAM_MODEL = "SmolLM2-135M-Instruct"


async def first_token_s(client: httpx.AsyncClient, root_url: str, model: str) -> float:
    """Seconds from sending one streamed chat request to its first content chunk (the stream is read to its end)."""
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4, "stream": True,
            "temperature": 0, "logit_bias": EOS_BANS}
    start = time.perf_counter()
    first = None
    async with client.stream("POST", root_url + "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if first is None and line.startswith("data: {") and '"content":"' in line and '"content":""' not in line:
                first = time.perf_counter() - start
    if first is None:
        raise RuntimeError(f"no content from {root_url}")
    return first


async def latency_run(peers: dict[str, tuple[str, str]], num_requests: int) -> dict[str, list[float]]:
    ttft: dict[str, list[float]] = {name: [] for name in peers}
    async with httpx.AsyncClient(timeout=120) as client:
        for url, model in peers.values():  # warm-up: connections, prompt cache
            await first_token_s(client, url, model)
        for i in range(num_requests):
            for name in (list(peers) if i % 2 == 0 else list(reversed(peers))):
                ttft[name].append(await first_token_s(client, *peers[name]))
    return ttft


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=50, help="sequential requests per path (latency phase)")
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
    print(f"cores: upstream and load generator {upstream_cores}, gateway {gateway_cores}", flush=True)
    gateway = None
    try:
        config = Path(tempfile.mkdtemp()) / "models.yaml"
        config.write_text(json.dumps({"models": [{
            "id": "via-gateway", "upstream_model": UPSTREAM_MODEL, "context_window": 1024,
            "upstreams": [{"url": upstream.base_url}]}]}))
        os.sched_setaffinity(0, gateway_cores)
        gateway = start_server("--no-auth", "--config", str(config), api_key=None)
        os.sched_setaffinity(0, upstream_cores)
        peers = {"direct": (upstream.root_url, UPSTREAM_MODEL), "gateway": (gateway.root_url, "via-gateway")}
        latency = asyncio.run(latency_run(peers, args.requests)) if args.requests else {}
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
    if latency:
        print(f"\nlatency: {args.requests} sequential streamed requests per path, --cores {args.cores}")
        print("| path | TTFT p50 | TTFT p90 |\n| --- | ---: | ---: |")
        for name, values in latency.items():
            print(f"| {name} | {pct(values, 50) * 1000:.1f} ms | {pct(values, 90) * 1000:.1f} ms |")
        added = (pct(latency["gateway"], 50) - pct(latency["direct"], 50)) * 1000
        print(f"TTFT added by the hop (p50): {added:+.1f} ms")
    if args.rounds:
        summary = {}
        for name, runs in results.items():
            summary[name] = (statistics.median(r.tok_per_s for r in runs),
                             statistics.median(pct(r.ttft_s, 50) for r in runs),
                             statistics.median(pct(r.itl_s, 50) for r in runs))
        print(f"\nload: {args.streams} streams x {args.max_tokens} tokens, medians of {args.rounds} rounds, --cores {args.cores}")
        print("| path | output tok/s | TTFT p50 | ITL p50 |\n| --- | ---: | ---: | ---: |")
        for name, (tps, ttft, itl) in summary.items():
            print(f"| {name} | {tps:.1f} | {ttft * 1000:.1f} ms | {itl * 1000:.1f} ms |")
        (d_tps, d_ttft, _), (g_tps, g_ttft, _) = summary["direct"], summary["gateway"]
        print(f"gateway / direct throughput: {g_tps / d_tps:.3f}; TTFT p50 difference under load: {(g_ttft - d_ttft) * 1000:+.1f} ms")


if __name__ == "__main__":
    main()

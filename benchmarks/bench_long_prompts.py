"""How long other streams wait while long prompts arrive: one streaming client, and beside it a client that posts
prompts of ~13,500 tokens (each tokenized, then refused as longer than the context, so the engine never sees
them: what is measured is the HTTP side's preparation). Reports the streaming client's gaps between chunks.
Variants are checkouts, rounds alternate between them (as benchmarks/bench_ab.py):

    .venv/bin/python benchmarks/bench_long_prompts.py before=/path/to/old/checkout after=. --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.server import start_server  # noqa: E402

LONG = " ".join(f"Item {i}: the quick brown fox jumps over the lazy dog number {i}." for i in range(60)) * 12


async def one_round(base_url: str, model: str, num_long: int) -> list[float]:
    gaps: list[float] = []
    async with httpx.AsyncClient(base_url=base_url, timeout=300) as client:

        async def stream() -> None:
            body = {"model": model, "max_tokens": 300, "stream": True, "ignore_eos": True,
                    "messages": [{"role": "user", "content": "Tell me a long story."}]}
            last = None
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                async for line in response.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    now = time.perf_counter()
                    if last is not None:
                        gaps.append(now - last)
                    last = now

        async def long_prompts() -> None:
            await asyncio.sleep(0.5)  # the stream is under way
            for i in range(num_long):
                body = {"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": f"{i} {LONG}"}]}
                response = await client.post("/v1/chat/completions", json=body)
                assert response.status_code == 400, response.text  # longer than the context, as intended

        await asyncio.gather(stream(), long_prompts())
    return gaps[1:]  # the first gap is the stream's time to its first token


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="+", help="NAME=CHECKOUT")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--long-prompts", type=int, default=12)
    args = ap.parse_args()
    gaps: dict[str, list[float]] = {}
    for round_index in range(args.rounds):
        order = args.variants if round_index % 2 == 0 else args.variants[::-1]
        for spec in order:
            name, _, checkout = spec.partition("=")
            server = start_server("--no-auth", "--parallel", "8", api_key=None, cwd=str(Path(checkout).resolve()))
            try:
                gaps.setdefault(name, []).extend(asyncio.run(one_round(server.root_url, server.model,
                                                                       args.long_prompts)))
            finally:
                server.stop()
    print("| variant | gaps | p50 ms | p99 ms | max ms |\n| --- | ---: | ---: | ---: | ---: |")
    for name, values in gaps.items():
        values.sort()
        p99 = values[min(len(values) - 1, int(len(values) * 0.99))]
        print(f"| {name} | {len(values)} | {statistics.median(values) * 1e3:.1f} | {p99 * 1e3:.1f} | "
              f"{values[-1] * 1e3:.1f} |")


if __name__ == "__main__":
    main()

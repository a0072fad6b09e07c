"""Workloads beyond "N identical streams", side by side with llama-server, rounds interleaved (order reversed
every other round). Where bench.py measures the steady decode rate, these look for what a real client mix
exposes: users coming back after their slot was reused, bursts of one prompt, more clients than slots, long
prompts, long outputs, multi-turn chats.

    .venv/bin/python benchmarks/bench_scenarios.py                         # every scenario, 2 rounds
    .venv/bin/python benchmarks/bench_scenarios.py repeat-nonstream --rounds 4
    .venv/bin/python benchmarks/bench_scenarios.py --variants main=/path/to/checkout new=.

Reports output tok/s (all tokens delivered / wall time of the scenario), the per-round ratio to llama-server,
and time to first token (for non-streaming requests: the whole request) p50.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench import EOS_BANS, SAMPLING, add_peer_arguments, pct, start_llama_server  # noqa: E402
from benchmarks.bench_ab import start_variant  # noqa: E402
from deepserve.bundled import bundled_model_path  # noqa: E402

LONG = " ".join(f"Item {i}: the quick brown fox jumps over the lazy dog number {i}." for i in range(60))


@dataclass
class Result:
    num_tokens: int = 0
    wall_s: float = 0.0
    first_s: list[float] = field(default_factory=list)  # time to first token (non-streaming: whole request)
    num_failed: int = 0

    @property
    def tok_per_s(self) -> float:
        return self.num_tokens / self.wall_s if self.wall_s else 0.0


@dataclass
class Scenario:
    about: str
    concurrency: int
    num_requests: int
    max_tokens: int
    stream: bool
    prompt: Callable[[int, str], str] | None = None  # (request index, per-run nonce) -> user message
    turns: int = 1  # > 1: each request is a user's conversation of that many turns


SCENARIOS = {
    "repeat-nonstream": Scenario(
        "24 non-streaming requests of 32 tokens, 4 at a time; the same 24 prompts every round (users coming back)",
        4, 24, 32, False, lambda i, nonce: f"Question {i}: name a colour and say why you like it."),
    "burst-fresh": Scenario(
        "8 streams of 64 tokens with one prompt, new every round (a load test's first wave, n > 1)",
        8, 8, 64, True, lambda i, nonce: f"Batch {nonce}. Write a short story about a robot who learns to paint."),
    "queue-16": Scenario("16 streams of 64 tokens for 8 slots", 16, 16, 64, True,
                         lambda i, nonce: "Write a story about a robot."),
    "long-prompts": Scenario("8 streams of 128 tokens, each a different ~900-token prompt", 8, 8, 128, True,
                             lambda i, nonce: f"[{i} {nonce}] {LONG} Summarise."),
    "stream-256": Scenario("8 streams of 256 tokens", 8, 8, 256, True, lambda i, nonce: "Write a story about a robot."),
    "multi-turn": Scenario(
        "12 users, 3 turns each (the history grows), 32 tokens a turn, all at once for 8 slots", 12, 12, 32, False,
        lambda i, nonce: f"User {i} here. Tell me something about the number {i}.", turns=3),
}


async def run_scenario(base_url: str, model: str, sc: Scenario) -> Result:
    nonce = str(time.time_ns())
    result = Result()
    limit = asyncio.Semaphore(sc.concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=600,
                                 limits=httpx.Limits(max_connections=sc.concurrency + 4)) as client:
        async def one(i: int) -> None:
            async with limit:
                messages = [{"role": "user", "content": sc.prompt(i, nonce)}]
                for turn in range(sc.turns):
                    try:
                        answer = await ask(client, model, messages, sc, result)
                    except (httpx.HTTPError, json.JSONDecodeError, KeyError):
                        result.num_failed += 1
                        return
                    messages += [{"role": "assistant", "content": answer},
                                 {"role": "user", "content": f"Thanks. Now tell me more, part {turn + 2}."}]

        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(sc.num_requests)))
        result.wall_s = time.perf_counter() - start
    return result


async def ask(client: httpx.AsyncClient, model: str, messages: list[dict], sc: Scenario, result: Result) -> str:
    body = {"model": model, "messages": messages, "max_tokens": sc.max_tokens, "stream": sc.stream, **SAMPLING,
            "ignore_eos": True, "logit_bias": EOS_BANS}
    start = time.perf_counter()
    if not sc.stream:
        r = await client.post("/v1/chat/completions", json=body)
        r.raise_for_status()
        data = r.json()
        result.first_s.append(time.perf_counter() - start)
        result.num_tokens += data["usage"]["completion_tokens"]
        return data["choices"][0]["message"]["content"]
    text, first = [], True
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            choices = json.loads(line[6:]).get("choices") or []
            content = choices[0].get("delta", {}).get("content") if choices else None
            if content:
                if first:
                    result.first_s.append(time.perf_counter() - start)
                    first = False
                result.num_tokens += 1
                text.append(content)
    return "".join(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scenarios", nargs="*", default=list(SCENARIOS), help=f"any of: {' '.join(SCENARIOS)}")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--variants", nargs="+", default=["deepserve=."], help="NAME=CHECKOUT[:ENV=VALUE,...]")
    add_peer_arguments(ap)
    args = ap.parse_args()
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        ap.error(f"unknown scenario(s) {', '.join(sorted(unknown))}; choose from {', '.join(SCENARIOS)}")

    servers, peers = [], {}
    proc = None
    try:
        for spec in args.variants:
            name, server = start_variant(spec, args)
            servers.append(server)
            peers[name] = (server.root_url, server.model)
        proc, url = start_llama_server(args.llama_server, bundled_model_path(), args.threads, args.parallel,
                                       args.ctx_size)
        peers["llama-server"] = (url, "smollm2")
        warm = Scenario("", 2, 2, 8, True, lambda i, nonce: "Hello")
        for target in peers.values():
            asyncio.run(run_scenario(*target, warm))
        results: dict[tuple[str, str], list[Result]] = {}
        for round_index in range(args.rounds):
            for name in args.scenarios:
                order = list(peers) if round_index % 2 == 0 else list(peers)[::-1]
                for peer in order:
                    r = asyncio.run(run_scenario(*peers[peer], SCENARIOS[name]))
                    results.setdefault((name, peer), []).append(r)
                    print(f"round {round_index + 1} {name:16s} {peer:14s} {r.tok_per_s:6.1f} tok/s "
                          f"first p50 {pct(r.first_s, 50) * 1e3:6.0f} ms  failed {r.num_failed}", flush=True)
    finally:
        for server in servers:
            server.stop()
        if proc is not None:
            proc.terminate()
            proc.wait()
    print(f"\nBundled SmolLM2-135M-Instruct Q4_1, {args.threads} threads, {args.parallel} slots, "
          f"{args.rounds} interleaved rounds (medians).\n")
    print("| scenario | peer | output tok/s | per-round vs llama-server | first token p50 ms | failed |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for name in args.scenarios:
        base = results[(name, "llama-server")]
        for peer in peers:
            runs = results[(name, peer)]
            ratio = statistics.median(r.tok_per_s / b.tok_per_s for r, b in zip(runs, base))
            tps = statistics.median(r.tok_per_s for r in runs)
            first = pct([t for r in runs for t in r.first_s], 50) * 1e3
            print(f"| {name} | {peer} | {tps:.1f} | {ratio:.2f}x | {first:.0f} | {sum(r.num_failed for r in runs)} |")
    print()
    for name in args.scenarios:
        print(f"- {name}: {SCENARIOS[name].about}")


if __name__ == "__main__":
    main()

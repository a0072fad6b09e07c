"""A/B: deepserve built from different checkouts (or run with different settings), side by side with
llama-server, rounds interleaved with the order reversed every other round. For changes to the engine or the
HTTP path, whose effect (a few %) is below the run-to-run spread of a shared machine.

    .venv/bin/python benchmarks/bench_ab.py before=/path/to/old/checkout after=.        # 9 rounds of 8 streams
    .venv/bin/python benchmarks/bench_ab.py a=. b=.:OMP_WAIT_POLICY=PASSIVE --streams 8 1 --rounds 5

A variant is NAME=CHECKOUT[:ENV=VALUE,...]: `python -m deepserve` started in CHECKOUT imports deepserve from
there. Same bundled GGUF, threads, slots and sampling as benchmarks/bench.py.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench import add_peer_arguments, http_run, pct, start_llama_server  # noqa: E402
from deepserve.bundled import bundled_model_path  # noqa: E402
from tests.server import RunningServer, start_server  # noqa: E402


def start_variant(spec: str, args: argparse.Namespace) -> tuple[str, RunningServer]:
    """Start deepserve for a NAME=CHECKOUT[:ENV=VALUE,...] variant, set up as every peer is (add_peer_arguments)."""
    name, _, rest = spec.partition("=")
    checkout, _, env_spec = rest.partition(":")
    env = dict(item.split("=", 1) for item in env_spec.split(",") if item)
    server = start_server("--no-auth", "--parallel", str(args.parallel), "--ctx-size", str(args.ctx_size),
                          api_key=None, env=env, threads=args.threads, cwd=str(Path(checkout).resolve()))
    return name, server


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="+", help="NAME=CHECKOUT[:ENV=VALUE,...]")
    ap.add_argument("--streams", type=int, nargs="+", default=[8])
    ap.add_argument("--rounds", type=int, default=9)
    add_peer_arguments(ap)
    args = ap.parse_args()

    servers: list[RunningServer] = []
    procs: list[subprocess.Popen] = []
    peers: dict[str, tuple[str, str]] = {}
    try:
        for spec in args.variants:
            name, server = start_variant(spec, args)
            servers.append(server)
            peers[name] = (server.root_url, server.model)
        proc, url = start_llama_server(args.llama_server, bundled_model_path(), args.threads, args.parallel, args.ctx_size)
        procs.append(proc)
        peers["llama-server"] = (url, "smollm2")
        for url, model in peers.values():  # warm-up
            asyncio.run(http_run(url, model, 2, 8))
        results: dict[tuple[str, int], list] = {}
        for round_index in range(args.rounds):
            for streams in args.streams:
                order = list(peers) if round_index % 2 == 0 else list(peers)[::-1]
                for name in order:
                    result = asyncio.run(http_run(*peers[name], streams, args.max_tokens))
                    results.setdefault((name, streams), []).append(result)
                    print(f"round {round_index + 1} c={streams} {name:14s} {result.tok_per_s:6.1f} tok/s", flush=True)
    finally:
        for server in servers:
            server.stop()
        for proc in procs:
            proc.terminate()
            proc.wait()
    print("\n| variant | streams | output tok/s | vs llama-server | per-round vs llama-server | TTFT p50 ms | ITL p50 ms |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for streams in args.streams:
        base = results[("llama-server", streams)]
        base_tps = statistics.median(r.tok_per_s for r in base)
        for name in peers:
            runs = results[(name, streams)]
            tps = statistics.median(r.tok_per_s for r in runs)
            per_round = statistics.median(r.tok_per_s / b.tok_per_s for r, b in zip(runs, base))
            print(f"| {name} | {streams} | {tps:.1f} | {tps / base_tps:.2f}x | {per_round:.2f}x | "
                  f"{pct([t for r in runs for t in r.ttft_s], 50) * 1e3:.0f} | {pct([t for r in runs for t in r.itl_s], 50) * 1e3:.1f} |")


if __name__ == "__main__":
    main()

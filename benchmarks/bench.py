"""Throughput/latency benchmark: deepserve vs llama.cpp's llama-server vs llama-cpp-python's server vs
the engine limit (our engine driven in-process, no HTTP), interleaved in one run. Plus a memory soak.

    make bench                       # or: .venv/bin/python benchmarks/bench.py --help
    benchmarks/build_llama_server.sh # once, to build peer (a); it is skipped if absent

All traffic goes to 127.0.0.1. Reports medians over rounds; compare ratios, not absolute figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deepserve.bundled import bundled_model_path  # noqa: E402
from deepserve.catalog.plan import engine_cpus  # noqa: E402
from tests.server import start_server  # noqa: E402

PROMPT = "Write a long story about a robot who learns to paint."
# llama-server's own sampling defaults, sent to every peer so all do the same sampling work.
SAMPLING = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05}
EOS_BANS = {"0": -100, "1": -100, "2": -100}  # SmolLM2's <|endoftext|>, <|im_start|>, <|im_end|>


@dataclass
class RunResult:
    num_tokens: int = 0
    num_failed_streams: int = 0  # streams the server cut off or refused
    wall_s: float = 0.0
    ttft_s: list[float] = field(default_factory=list)
    itl_s: list[float] = field(default_factory=list)

    @property
    def tok_per_s(self) -> float:
        return self.num_tokens / self.wall_s if self.wall_s else 0.0


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- HTTP peers ---------------------------------------------------------------------------------
async def one_stream(client: httpx.AsyncClient, url: str, body: dict, result: RunResult) -> None:
    try:
        await _one_stream(client, url, body, result)
    except (httpx.HTTPError, json.JSONDecodeError):
        result.num_failed_streams += 1


async def _one_stream(client: httpx.AsyncClient, url: str, body: dict, result: RunResult) -> None:
    start = time.perf_counter()
    last = None
    async with client.stream("POST", url, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            choices = chunk.get("choices") or []
            if not choices:
                continue
            delta = choices[0].get("delta", {})
            if not delta.get("content"):
                continue
            now = time.perf_counter()
            if last is None:
                result.ttft_s.append(now - start)
            else:
                result.itl_s.append(now - last)
            last = now
            result.num_tokens += 1


async def http_run(base_url: str, model: str, concurrency: int, max_tokens: int) -> RunResult:
    body = {
        "model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens,
        "stream": True, **SAMPLING, "ignore_eos": True, "logit_bias": EOS_BANS,
    }
    result = RunResult()
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        start = time.perf_counter()
        await asyncio.gather(*(one_stream(client, f"{base_url}/v1/chat/completions", body, result) for _ in range(concurrency)))
        result.wall_s = time.perf_counter() - start
    return result


def wait_http_ready(url: str, process: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url} exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{url} not ready in {timeout_s}s")


def start_llama_server(binary: Path, gguf: Path, threads: int, parallel: int, ctx: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [str(binary), "-m", str(gguf), "-np", str(parallel), "-c", str(ctx * parallel), "-t", str(threads),
         "-tb", str(threads), "--host", "127.0.0.1", "--port", str(port), "--no-webui"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    wait_http_ready(url + "/health", proc)
    return proc, url


def start_llama_cpp_python_server(gguf: Path, threads: int, ctx: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--n_threads", str(threads),
         "--n_ctx", str(ctx), "--host", "127.0.0.1", "--port", str(port), "--model_alias", "smollm2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    wait_http_ready(url + "/v1/models", proc)
    return proc, url


# ---- the engine limit ---------------------------------------------------------------------------
async def engine_run(engine, prompt_tokens: list[int], concurrency: int, max_tokens: int) -> RunResult:
    from deepserve.engine.types import GenerateRequest, SamplingParams

    result = RunResult()

    async def one() -> None:
        params = SamplingParams(**SAMPLING, max_tokens=max_tokens, ignore_eos=True)
        start, last = time.perf_counter(), None
        async for delta in engine.submit(GenerateRequest(prompt_tokens=list(prompt_tokens), sampling=params)):
            if not delta.token_ids:
                continue
            now = time.perf_counter()
            if last is None:
                result.ttft_s.append(now - start)
            else:
                result.itl_s.append(now - last)
            last = now
            result.num_tokens += len(delta.token_ids)

    start = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(concurrency)))
    result.wall_s = time.perf_counter() - start
    return result


# ---- memory soak --------------------------------------------------------------------------------
async def soak(base_url: str, model: str, num_requests: int, concurrency: int) -> None:
    rng = random.Random(0)
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600) as client:

        async def one(i: int) -> None:
            async with sem:
                body = {
                    "model": model, "max_tokens": rng.randint(1, 48), "stream": i % 2 == 0, "seed": i,
                    "messages": [{"role": "user", "content": f"Request {i}: " + "tell me more. " * rng.randint(1, 60)}],
                }
                if i % 10 == 0:  # every tenth stream hangs up after two chunks: an abort
                    body["stream"] = True
                    async with client.stream("POST", f"{base_url}/v1/chat/completions", json=body) as r:
                        seen = 0
                        async for _ in r.aiter_lines():
                            seen += 1
                            if seen >= 4:
                                break
                    return
                r = await client.post(f"{base_url}/v1/chat/completions", json=body)
                r.raise_for_status()

        await asyncio.gather(*(one(i) for i in range(num_requests)))


def rss_mib(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


# ---- main ---------------------------------------------------------------------------------------
def add_peer_arguments(ap: argparse.ArgumentParser) -> None:
    """How every peer is set up and asked (bench.py and bench_ab.py alike): output tokens, threads, slots,
    context, and the llama-server binary."""
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--ctx-size", type=int, default=2048)
    ap.add_argument("--llama-server", type=Path, default=ROOT / "benchmarks/peers/llama-server")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--rounds", type=int, default=3)
    add_peer_arguments(ap)
    ap.add_argument("--skip", nargs="*", default=[], help="peers to skip: llama-server llama-cpp-python engine")
    ap.add_argument("--memory-requests", type=int, default=1000, help="0 skips the memory soak")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/latest.md")
    args = ap.parse_args()

    gguf = bundled_model_path()
    peers: dict[str, object] = {}
    procs: list[subprocess.Popen] = []
    ours = start_server("--no-auth", "--parallel", str(args.parallel), "--ctx-size", str(args.ctx_size),
                        "--threads", str(args.threads), api_key=None)
    peers["deepserve"] = (ours.root_url, ours.model)
    rss_at_start = rss_mib(ours.process.pid)
    try:
        if "llama-server" not in args.skip and args.llama_server.exists():
            proc, url = start_llama_server(args.llama_server, gguf, args.threads, args.parallel, args.ctx_size)
            procs.append(proc)
            peers["llama-server"] = (url, "smollm2")
        if "llama-cpp-python" not in args.skip:
            try:
                proc, url = start_llama_cpp_python_server(gguf, args.threads, args.ctx_size)
                procs.append(proc)
                peers["llama-cpp-python"] = (url, "smollm2")
            except RuntimeError as exc:
                print(f"skipping llama-cpp-python server: {exc} (pip install 'llama-cpp-python[server]')")
        engine = None
        if "engine" not in args.skip:
            from deepserve.engine.llamacpp.loop import LlamaCppEngine

            [cpus] = engine_cpus(args.threads, 1)  # pinned as `deepserve serve` pins its engine (--pin-threads)
            engine = LlamaCppEngine(str(gguf), "engine", ctx_size=args.ctx_size, parallel=args.parallel,
                                    threads=args.threads, cpus=cpus)
            prompt_tokens = engine.tokenize(
                f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n", add_special=False
            )
            peers["engine limit"] = None

        results: dict[tuple[str, int], list[RunResult]] = {}
        for name, target in peers.items():  # warm-up
            if target is None:
                asyncio.run(engine_run(engine, prompt_tokens, 1, 8))
            else:
                asyncio.run(http_run(target[0], target[1], 1, 8))
        for round_index in range(args.rounds):
            for concurrency in args.concurrency:
                # Interleaved, and in reverse order every other round: noise, and whatever a peer leaves behind on the
                # cores for the next one (llama.cpp's OpenMP threads spin for a while after their last step), hit
                # every peer alike.
                order = list(peers.items()) if round_index % 2 == 0 else list(peers.items())[::-1]
                for name, target in order:
                    if target is None:
                        r = asyncio.run(engine_run(engine, prompt_tokens, concurrency, args.max_tokens))
                    else:
                        r = asyncio.run(http_run(target[0], target[1], concurrency, args.max_tokens))
                    results.setdefault((name, concurrency), []).append(r)
                    print(f"round {round_index + 1} c={concurrency} {name:18s} {r.tok_per_s:7.1f} tok/s "
                          f"({r.num_tokens} tokens, {r.num_failed_streams} failed streams)", flush=True)
        if engine is not None:
            engine.close()
        for proc in procs:
            proc.terminate()
            proc.wait()

        lines = [
            f"Bundled SmolLM2-135M-Instruct Q4_1, {args.threads} threads, {args.parallel} slots, "
            f"{args.max_tokens} output tokens per stream, median of {args.rounds} interleaved rounds.",
            "",
            "| peer | streams | output tok/s | vs llama-server | per-round vs llama-server | TTFT p50 ms | ITL p50 ms | ITL p99 ms | tokens delivered | failed streams |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for concurrency in args.concurrency:
            base = results.get(("llama-server", concurrency))
            base_tps = statistics.median(r.tok_per_s for r in base) if base else None
            for name in peers:
                runs = results[(name, concurrency)]
                tps = statistics.median(r.tok_per_s for r in runs)
                ttft = [t for r in runs for t in r.ttft_s]
                itl = [t for r in runs for t in r.itl_s]
                delivered = statistics.median(r.num_tokens for r in runs)
                ratio = f"{tps / base_tps:.2f}x" if base_tps else "n/a"
                # The same round's figures side by side, then the median of those ratios: less swayed by a round
                # that was slow for everyone than the ratio of the medians.
                per_round = f"{statistics.median(r.tok_per_s / b.tok_per_s for r, b in zip(runs, base)):.2f}x" if base else "n/a"
                lines.append(
                    f"| {name} | {concurrency} | {tps:.1f} | {ratio} | {per_round} | {pct(ttft, 50) * 1e3:.0f} | "
                    f"{pct(itl, 50) * 1e3:.1f} | {pct(itl, 99) * 1e3:.1f} | {delivered:.0f}/{concurrency * args.max_tokens} | "
                    f"{sum(r.num_failed_streams for r in runs)}/{concurrency * len(runs)} |"
                )
        top = max(args.concurrency)
        if ("engine limit", top) in results:
            ours_tps = statistics.median(r.tok_per_s for r in results[("deepserve", top)])
            limit = statistics.median(r.tok_per_s for r in results[("engine limit", top)])
            lines += ["", f"deepserve / engine limit at {top} streams: {ours_tps / limit:.2f}x"]

        if args.memory_requests:
            before_soak = rss_mib(ours.process.pid)
            asyncio.run(soak(ours.root_url, ours.model, args.memory_requests, args.parallel))
            after_soak = rss_mib(ours.process.pid)
            stats = httpx.get(ours.root_url + "/health").json()["engines"][0]
            cache = stats.get("prompt_cache") or {"limit_bytes": 0, "bytes": 0, "entries": 0}
            lines += [
                "",
                f"Memory (deepserve RSS): {rss_at_start:.0f} MiB after start, {before_soak:.0f} MiB after the "
                f"benchmark runs, {after_soak:.0f} MiB after {args.memory_requests} more requests (mixed lengths, "
                f"every tenth aborted); "
                f"engine: {stats['num_requests_finished']} requests finished, {stats['num_running']} running; "
                f"host prompt cache (--cache-ram {cache['limit_bytes'] // 2**20} MiB): {cache['bytes'] / 2**20:.0f} MiB "
                f"in {cache['entries']} saved slot states.",
            ]
        report = "\n".join(lines)
        print("\n" + report)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report + "\n")
    finally:
        ours.stop()
        for proc in procs:
            if proc.poll() is None:
                proc.kill()


if __name__ == "__main__":
    main()

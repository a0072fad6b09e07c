"""An engine given CPUs pins its llama.cpp threads one to each (bundled model, in-process)."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest

from deepserve.bundled import bundled_model_path
from deepserve.engine.llamacpp.loop import LlamaCppEngine
from deepserve.engine.types import GenerateRequest, SamplingParams

CPUS = sorted(os.sched_getaffinity(0))


def generate(engine: LlamaCppEngine) -> int:
    prompt = engine.tokenize("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", add_special=False)

    async def run() -> int:
        stream = engine.submit(GenerateRequest(prompt, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)))
        return sum([len(d.token_ids) async for d in stream])

    return asyncio.run(run())


def thread_cpus() -> dict[int, set[int]]:
    """CPU affinity of every thread of this process, by thread id."""
    return {int(tid): os.sched_getaffinity(int(tid)) for tid in os.listdir("/proc/self/task")}


def engine_thread_id() -> int:
    [thread] = [t for t in threading.enumerate() if t.name == "deepserve-engine"]
    return thread.native_id


def test_one_thread_engine_runs_on_its_cpu():
    cpu = CPUS[-1]
    engine = LlamaCppEngine(str(bundled_model_path()), "m", ctx_size=128, parallel=1, threads=1, cpus=(cpu,))
    try:
        assert generate(engine) == 4
        assert engine.stats()["cpus"] == [cpu]
        assert os.sched_getaffinity(engine_thread_id()) == {cpu}
        assert os.sched_getaffinity(0) == set(CPUS)  # the caller's thread is not touched
    finally:
        engine.close()


@pytest.mark.skipif(len(CPUS) < 2, reason="needs two CPUs")
def test_two_threads_each_get_one_cpu_of_their_own():
    first, second = CPUS[-2], CPUS[-1]
    engine = LlamaCppEngine(str(bundled_model_path()), "m", ctx_size=128, parallel=2, threads=2,
                            cpus=(first, second))
    try:
        assert generate(engine) == 4
        assert os.sched_getaffinity(engine_thread_id()) == {first}
        # llama.cpp's second thread (an OpenMP worker) is pinned to the second CPU.
        assert {second} in [cpus for tid, cpus in thread_cpus().items() if tid != engine_thread_id()]
    finally:
        engine.close()


def test_fewer_cpus_than_threads_pins_nothing():
    engine = LlamaCppEngine(str(bundled_model_path()), "m", ctx_size=128, parallel=1, threads=2, cpus=(CPUS[0],))
    try:
        assert generate(engine) == 4
        assert engine.stats()["cpus"] == []
        assert os.sched_getaffinity(engine_thread_id()) == set(CPUS)
    finally:
        engine.close()

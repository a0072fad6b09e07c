"""Which models `deepserve serve` loads, decided before any weights are read."""

from __future__ import annotations

import pytest

from deepserve.bundled import BUNDLED_MODEL_ID, bundled_model_path
from deepserve.catalog import default_catalog
from deepserve.catalog.plan import ModelUnavailableError, plan_models
from deepserve.catalog.registry import LocalModel, LocalRegistry
from deepserve.config import Settings

R1_32B = "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B"


@pytest.fixture()
def registry(tmp_path) -> LocalRegistry:
    return LocalRegistry(tmp_path / "data")


@pytest.fixture()
def gguf(tmp_path):
    path = tmp_path / "w.gguf"
    path.write_bytes(b"GGUF")
    return str(path)


def plan(registry, **settings):
    return plan_models(Settings(data_dir=registry.data_dir, **settings), default_catalog(), registry)


def test_default_is_the_bundled_model_plus_every_registered_one_present(registry, gguf):
    registry.add(LocalModel(id=R1_32B, path=gguf, source="pull"))
    registry.add(LocalModel(id="mine", path=gguf, source="add", template="deepseek-llm"))
    registry.add(LocalModel(id="gone", path=gguf + ".missing", source="add"))
    plans = plan(registry)
    assert [(p.model_id, p.template) for p in plans] == [
        (BUNDLED_MODEL_ID, None), (R1_32B, None), ("mine", "deepseek-llm")]
    assert plans[0].path == str(bundled_model_path()) and plans[0].entry.owned_by == "HuggingFaceTB"
    assert plans[1].entry.id == R1_32B and plans[2].entry is None


def test_named_models_resolve_aliases_and_skip_the_bundled_one(registry, gguf):
    registry.add(LocalModel(id=R1_32B, path=gguf, source="pull"))
    plans = plan(registry, models=["deepseek-r1-32b", R1_32B])
    assert [p.model_id for p in plans] == [R1_32B]
    assert [p.model_id for p in plan(registry, models=["SmolLM2-135M-Instruct", "deepseek-r1-32b"])] == [
        BUNDLED_MODEL_ID, R1_32B]


def test_a_named_model_without_weights_names_the_pull_command(registry):
    with pytest.raises(ModelUnavailableError, match="`deepserve models pull deepseek-ai/deepseek-coder-6.7b-instruct`"):
        plan(registry, models=["deepseek-coder-6.7b-instruct"])
    with pytest.raises(ModelUnavailableError, match="upstream engine"):
        plan(registry, models=["deepseek-reasoner"])
    with pytest.raises(ModelUnavailableError, match="models add nonsense --gguf PATH"):
        plan(registry, models=["nonsense"])


def test_model_path_serves_that_file_with_the_facts_of_the_id_it_is_given(registry, gguf):
    [only] = plan(registry, model_path=gguf, model_id="deepseek-r1-32b", template="deepseek-r1")
    assert (only.model_id, only.path, only.entry.id, only.template) == ("deepseek-r1-32b", gguf, R1_32B, "deepseek-r1")
    [anonymous] = plan(registry, model_path=gguf)
    assert anonymous.model_id == "w" and anonymous.entry is None
    with pytest.raises(ModelUnavailableError, match="upstream engine"):
        plan(registry, model_path=gguf, model_id="deepseek-reasoner")


def test_operator_template_overrides_the_registered_one(registry, gguf):
    registry.add(LocalModel(id="mine", path=gguf, source="add", template="deepseek-llm"))
    assert plan(registry, models=["mine"])[0].template == "deepseek-llm"
    assert plan(registry, models=["mine"], template="chatml")[0].template == "chatml"
    assert [p.template for p in plan(registry, template="chatml")] == ["chatml", "chatml"]
    with pytest.raises(ModelUnavailableError, match="unknown chat template"):
        plan(registry, template="alpaca")


def test_several_models_split_the_cores_and_threads_is_per_model(registry, gguf, monkeypatch):
    registry.add(LocalModel(id=R1_32B, path=gguf, source="pull"))
    registry.add(LocalModel(id="mine", path=gguf, source="add"))
    monkeypatch.setattr("deepserve.catalog.plan.available_cores", lambda: 8)
    assert [p.threads for p in plan(registry)] == [2, 2, 2]  # 8 cores, 3 engines: never 3 x 8 threads
    assert [p.threads for p in plan(registry, models=["mine"])] == [8]  # one model: every core
    assert [p.threads for p in plan(registry, threads=3)] == [3, 3, 3]  # --threads: each engine's own
    monkeypatch.setattr("deepserve.catalog.plan.available_cores", lambda: 2)
    assert [p.threads for p in plan(registry)] == [1, 1, 1]  # at least one each


def test_each_engine_gets_cpus_of_its_own_unless_threads_outnumber_them(registry, gguf, monkeypatch):
    registry.add(LocalModel(id=R1_32B, path=gguf, source="pull"))
    registry.add(LocalModel(id="mine", path=gguf, source="add"))
    monkeypatch.setattr("deepserve.catalog.plan.available_cores", lambda: 6)
    monkeypatch.setattr("deepserve.catalog.plan.allowed_cpus", lambda: [2, 3, 5, 8, 9, 11])  # a taskset's CPUs
    assert [p.cpus for p in plan(registry)] == [(2, 3), (5, 8), (9, 11)]
    assert [p.cpus for p in plan(registry, models=["mine"])] == [(2, 3, 5, 8, 9, 11)]
    assert [p.cpus for p in plan(registry, threads=3)] == [None, None, None]  # 9 threads, 6 CPUs: none pinned
    # 3 threads, 6 CPUs: the rest of the machine may be someone else's (another deepserve): none pinned.
    assert [p.cpus for p in plan(registry, models=["mine"], threads=3)] == [None]
    assert [p.cpus for p in plan(registry, models=["mine"], threads=6)] == [(2, 3, 5, 8, 9, 11)]
    assert [p.cpus for p in plan(registry, pin_threads=False)] == [None, None, None]


def test_available_cores_is_this_process_cpu_affinity():
    import os

    from deepserve.catalog.plan import available_cores

    assert available_cores() == len(os.sched_getaffinity(0))


def test_ctx_size_is_clamped_to_each_catalog_models_window(registry, gguf):
    math = "deepseek-ai/deepseek-math-7b-instruct"  # 4,096-token window
    registry.add(LocalModel(id=math, path=gguf, source="pull"))
    registry.add(LocalModel(id=R1_32B, path=gguf, source="pull"))  # 131,072
    registry.add(LocalModel(id="mine", path=gguf, source="add"))  # unknown: the engine clamps to its GGUF
    plans = {p.model_id: p.ctx_size for p in plan(registry, ctx_size=16384)}
    assert plans == {BUNDLED_MODEL_ID: 8192, math: 4096, R1_32B: 16384, "mine": 16384}
    assert {p.ctx_size for p in plan(registry)} == {2048}  # the default fits every window


def test_the_ram_prompt_cache_is_llama_servers_8_gib_within_a_quarter_of_the_machine(registry, gguf, monkeypatch):
    from deepserve.catalog.plan import default_cache_ram_mib

    assert default_cache_ram_mib(1, total_mib=64 * 1024) == 8192  # a big machine: llama-server's default
    assert default_cache_ram_mib(1, total_mib=16 * 1024) == 4096  # a quarter of 16 GiB
    assert default_cache_ram_mib(3, total_mib=24 * 1024) == 2048  # three engines share that quarter
    registry.add(LocalModel(id="mine", path=gguf, source="add"))
    monkeypatch.setattr("deepserve.catalog.plan.default_cache_ram_mib", lambda n: 1000 // n)
    assert [p.cache_ram_mib for p in plan(registry)] == [500, 500]  # the bundled model and "mine"
    assert [p.cache_ram_mib for p in plan(registry, cache_ram_mib=64)] == [64, 64]  # --cache-ram: each engine's
    assert [p.cache_ram_mib for p in plan(registry, cache_ram_mib=0)] == [0, 0]  # off

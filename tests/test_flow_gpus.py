"""GPU assignment: disjoint sets and ports for parallel recipes, waiting when GPUs are short."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from flows.config import GpuSettings, LaunchSettings, PipelineConfig, RecipeStage, StageData
from flows.gpus import DeviceLocks, GpuPlanError, Placement, PortPool, plan_placements, visible_gpus


def config_with(tmp_path: Path, recipes: int = 2, **gpus) -> PipelineConfig:
    data = StageData(data_path=tmp_path / "d.json", image_folder=tmp_path)
    config = PipelineConfig.tutorial(
        output_root=tmp_path, llm=tmp_path, vision_tower=tmp_path,
        pretrain_data=data, recipe_1_data=data, recipe_2_data=data,
    )
    names = [f"recipe-{i + 1}" for i in range(recipes)]
    return config.model_copy(update={
        "gpus": GpuSettings(**gpus),
        "recipes": [RecipeStage(name=n, data=data, weight=1 / recipes) for n in names],
    })


def test_eight_gpus_two_recipes_side_by_side(tmp_path):
    plan = plan_placements(config_with(tmp_path), list(range(8)))
    assert plan["pretrain"].devices == tuple(range(8))
    assert plan["recipe-1"].devices == (0, 1, 2, 3) and plan["recipe-2"].devices == (4, 5, 6, 7)
    ports = {p.preferred_port for p in plan.values()}
    assert len(ports) == 3
    assert plan["recipe-2"].launcher_flags(29502) == ["--master_port", "29502", "--include", "localhost:4,5,6,7"]


def test_too_few_gpus_means_the_same_set_so_recipes_take_turns(tmp_path):
    plan = plan_placements(config_with(tmp_path, gpus_per_recipe=2), [0, 1, 2])
    assert plan["recipe-1"].devices == (0, 1) and plan["recipe-2"].devices == (0, 1)
    one = plan_placements(config_with(tmp_path), [5])
    assert one["recipe-1"].devices == one["recipe-2"].devices == (5,)


def test_three_recipes_on_four_gpus_wrap_around(tmp_path):
    plan = plan_placements(config_with(tmp_path, recipes=3), [0, 1, 2, 3])
    assert [plan[f"recipe-{i}"].devices for i in (1, 2, 3)] == [(0,), (1,), (2,)]
    plan = plan_placements(config_with(tmp_path, recipes=3, gpus_per_recipe=2), [0, 1, 2, 3])
    assert [plan[f"recipe-{i}"].devices for i in (1, 2, 3)] == [(0, 1), (2, 3), (0, 1)]


def test_no_gpu_is_the_cpu_path_with_cores_shared(tmp_path):
    plan = plan_placements(config_with(tmp_path), [], cpu_count=8)
    assert all(p.on_cpu for p in plan.values())
    assert plan["pretrain"].cpu_threads == 8 and plan["recipe-1"].cpu_threads == 4
    assert plan["recipe-1"].launcher_flags(29501) == ["--master_port", "29501", "--num_gpus", "1"]
    assert plan["recipe-1"].env() == {"OMP_NUM_THREADS": "4", "CUDA_VISIBLE_DEVICES": ""}


def test_hostfile_and_explicit_include_are_passed_through(tmp_path):
    config = config_with(tmp_path)
    recipe = config.recipes[0].model_copy(update={"launch": LaunchSettings(hostfile=tmp_path / "hosts", include="a:0,1@b:0,1")})
    plan = plan_placements(config.model_copy(update={"recipes": [recipe, config.recipes[1]]}), [0, 1])
    assert plan["recipe-1"].launcher_flags(29501) == [
        "--master_port", "29501", "--hostfile", str(tmp_path / "hosts"), "--include", "a:0,1@b:0,1"]
    assert plan["recipe-2"].devices == (0,)  # the hostfile recipe takes no local GPU


def test_impossible_assignments_are_refused(tmp_path):
    with pytest.raises(GpuPlanError, match=r"gpus.devices \[7\] are not visible"):
        plan_placements(config_with(tmp_path, devices=[0, 7]), [0, 1])
    with pytest.raises(GpuPlanError, match="recipe recipe-1 asks for 4 GPUs, 2 available"):
        plan_placements(config_with(tmp_path, gpus_per_recipe=4), [0, 1])


def test_visible_gpus_follow_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert visible_gpus() == [2, 3]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == []


def test_stages_on_the_same_gpus_never_overlap():
    locks = DeviceLocks()
    spans: dict[str, tuple[float, float]] = {}
    waited = []

    def stage(name: str, devices: tuple[int, ...]) -> None:
        with locks.hold(devices, on_wait=lambda: waited.append(name)):
            begin = time.monotonic()
            time.sleep(0.2)
            spans[name] = (begin, time.monotonic())

    threads = [threading.Thread(target=stage, args=a) for a in [("a", (0, 1)), ("b", (1, 0)), ("c", (2,))]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    (a0, a1), (b0, b1), (c0, _) = spans["a"], spans["b"], spans["c"]
    assert a1 <= b0 or b1 <= a0  # shared GPU 1: one after the other
    assert len(waited) == 1 and waited[0] in "ab"
    assert c0 < max(a1, b1)  # GPU 2 was free: ran alongside


def test_ports_are_distinct_while_held():
    pool = PortPool()
    with pool.reserve(29700) as first, pool.reserve(29700) as second:
        assert first != second
    with pool.reserve(29700) as again:
        assert again == first


def test_placement_default_is_cpu():
    assert Placement().on_cpu and not Placement(devices=(0,)).on_cpu

"""GPU assignment: disjoint sets and ports for parallel recipes, waiting when GPUs are short."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from flows.config import GpuSettings, LaunchSettings, PipelineConfig, RecipeStage, StageData
from flows.gpus import GpuPlanError, Placement, plan_placements, visible_gpus
from flows.stages import MergeJob, TrainJob, pipeline_jobs


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
    (tmp_path / "hosts").write_text("a slots=4\nb slots=4\n")
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


def test_placement_default_is_cpu():
    assert Placement().on_cpu and not Placement(devices=(0,)).on_cpu


def two_node_config(tmp_path: Path, hostfile_text: str, include: str | None = None) -> PipelineConfig:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(hostfile_text)
    config = config_with(tmp_path)
    spanning = config.recipes[1].model_copy(update={"launch": LaunchSettings(hostfile=hostfile, include=include)})
    return config.model_copy(update={"recipes": [config.recipes[0], spanning]})


def test_a_stage_spanning_two_nodes_keeps_its_global_batch(tmp_path):
    """Two 8-GPU nodes in a DeepSpeed hostfile: 16 GPUs x 4 per device -> 2 micro-batches for 128."""
    config = two_node_config(tmp_path, "# two nodes\nnode-a slots=8\nnode-b slots=8\n")
    plan = plan_placements(config, list(range(8)))
    spanning = plan["recipe-2"]
    assert spanning.world_size == 16
    assert spanning.gpu_slots() == [f"gpu:node-a:{i}" for i in range(8)] + [f"gpu:node-b:{i}" for i in range(8)]
    job = pipeline_jobs(config, plan)["recipe-2"]
    assert isinstance(job, TrainJob)
    command = job.command({"pretrain": tmp_path / "pretrain"}, 29502)
    launcher = command[command.index("deepspeed.launcher.runner") + 1 : command.index(str(job.command({}, 1)[-len(job.flags) - 1]))]
    assert launcher == ["--master_port", "29502", "--hostfile", str(tmp_path / "hostfile")]
    flags = job.flags
    assert flags[flags.index("--gradient_accumulation_steps") + 1] == "2"
    assert flags[flags.index("--per_device_train_batch_size") + 1] == "4"
    # recipe-1 stays on this host and gets all its GPUs' share (the other recipe is elsewhere)
    assert plan["recipe-1"].devices == (0, 1, 2, 3)
    local = pipeline_jobs(config, plan)["recipe-1"].flags
    assert local[local.index("--gradient_accumulation_steps") + 1] == "8"


def test_include_selects_gpus_of_the_hostfile_for_the_batch(tmp_path):
    config = two_node_config(tmp_path, "node-a slots=8\nnode-b slots=8\n", include="node-a:0,1,2,3@node-b")
    spanning = plan_placements(config, [0])["recipe-2"]
    assert spanning.world_size == 12 and spanning.hosts == (("node-a", (0, 1, 2, 3)), ("node-b", tuple(range(8))))
    with pytest.raises(ValueError, match="not a multiple"):  # 128 / (4 x 12)
        pipeline_jobs(config, {"recipe-2": spanning})


def test_localhost_in_a_hostfile_is_this_hosts_slots(tmp_path):
    config = two_node_config(tmp_path, "localhost slots=2\n")
    spanning = plan_placements(config, [])["recipe-2"]
    assert spanning.gpu_slots() == [f"gpu:{socket.gethostname()}:0", f"gpu:{socket.gethostname()}:1"]
    assert Placement(devices=(3,)).gpu_slots() == [f"gpu:{socket.gethostname()}:3"]
    assert Placement().gpu_slots() == []


@pytest.mark.parametrize(
    ("text", "include", "message"),
    [
        ("localhost slots=1\nlocalhost slots=1\n", None, "multiple entries for localhost"),
        ("node-a slots=8\n", "node-c:0", "'node-c' not found in hostfile"),
        ("node-a eight\n", None, "bad entry"),
    ],
)
def test_hostfiles_deepspeed_would_refuse_are_refused_when_planning(tmp_path, text, include, message):
    with pytest.raises(GpuPlanError, match=message):
        plan_placements(two_node_config(tmp_path, text, include), [0])
    missing = config_with(tmp_path)
    recipe = missing.recipes[0].model_copy(update={"launch": LaunchSettings(hostfile=tmp_path / "nope")})
    with pytest.raises(GpuPlanError, match="nope"):
        plan_placements(missing.model_copy(update={"recipes": [recipe, missing.recipes[1]]}), [0])


def test_a_recipe_on_another_work_pool_is_planned_there_and_run_remotely(tmp_path):
    config = config_with(tmp_path)
    elsewhere = config.recipes[1].model_copy(update={"launch": LaunchSettings(work_pool="node-2", num_gpus=8)})
    config = config.model_copy(update={"recipes": [config.recipes[0], elsewhere]})
    here = plan_placements(config, list(range(8)))
    assert set(here) == {"pretrain", "recipe-1"} and here["recipe-1"].devices == tuple(range(8))  # alone here
    there = plan_placements(config, list(range(8)), work_pool="node-2")
    assert set(there) == {"recipe-2"} and there["recipe-2"].devices == tuple(range(8))
    assert there["recipe-2"].preferred_port == here["recipe-1"].preferred_port + 1

    jobs = pipeline_jobs(config, here)
    remote = {name: job.remote.deployment for name, job in jobs.items() if job.remote is not None}
    assert remote == {"recipe-2": "bunny-stage/node-2", "merge-recipe-2": "bunny-stage/node-2"}
    assert jobs["recipe-2"].remote.config == config
    on_node_2 = pipeline_jobs(config, there, work_pool="node-2")
    assert on_node_2["recipe-2"].remote is None and isinstance(on_node_2["merge-recipe-2"], MergeJob)
    assert on_node_2["merge-recipe-2"].remote is None and on_node_2["merge-recipe-2"].placement.devices == tuple(range(8))
    flags = on_node_2["recipe-2"].flags
    assert flags[flags.index("--gradient_accumulation_steps") + 1] == "4"  # 128 / (4 x 8)

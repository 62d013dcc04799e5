"""Stages on other work pools: preflight names a missing per-stage deployment before any stage."""

from __future__ import annotations

from prefect.exceptions import ObjectNotFound

from flows.config import LaunchSettings, PipelineConfig
from flows.stages import pipeline_jobs


class FakeClient:
    """The Prefect client's deployment lookup, over a fixed set of deployment names."""

    def __init__(self, deployed: set[str]) -> None:
        self.deployed = deployed
        self.asked: list[str] = []

    def __enter__(self) -> FakeClient:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def read_deployment_by_name(self, name: str) -> str:
        self.asked.append(name)
        if name not in self.deployed:
            raise ObjectNotFound(http_exc=Exception(name))
        return name


def remote_jobs(tiny_assets, tmp_path, pools: dict[str, str]):
    config = PipelineConfig.demo(tiny_assets, tmp_path / "out", steps=2)
    recipes = [recipe.model_copy(update={"launch": LaunchSettings(work_pool=pools[recipe.name])})
               if recipe.name in pools else recipe for recipe in config.recipes]
    jobs = pipeline_jobs(config.model_copy(update={"recipes": recipes}), {})
    return {name: job.remote for name, job in jobs.items() if job.remote is not None}


def test_a_stage_whose_pool_has_no_deployment_is_named(tiny_assets, tmp_path, monkeypatch):
    from flows import remote

    remotes = remote_jobs(tiny_assets, tmp_path, {"recipe-1": "pool-a", "recipe-2": "pool-b"})
    assert set(remotes) == {"recipe-1", "merge-recipe-1", "recipe-2", "merge-recipe-2"}
    client = FakeClient({"bunny-stage/pool-a"})
    monkeypatch.setattr(remote, "get_client", lambda sync_client: client)
    problems = remote.remote_deployment_problems(remotes)
    assert problems == [
        f"{stage}: no deployment 'bunny-stage/pool-b': deploy the per-stage flow to work pool 'pool-b' "
        "(deployments/README.md, 'Stages on other hosts')" for stage in ("recipe-2", "merge-recipe-2")
    ]
    assert sorted(set(client.asked)) == ["bunny-stage/pool-a", "bunny-stage/pool-b"]


def test_every_deployment_present_passes(tiny_assets, tmp_path, monkeypatch):
    from flows import remote

    remotes = remote_jobs(tiny_assets, tmp_path, {"recipe-2": "pool-b"})
    monkeypatch.setattr(remote, "get_client", lambda sync_client: FakeClient({"bunny-stage/pool-b"}))
    assert remote.remote_deployment_problems(remotes) == []

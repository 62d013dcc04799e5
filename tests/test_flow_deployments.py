"""deployments/prefect.yaml: every entrypoint loads and its default parameters fit the flow."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PREFECT_YAML = REPO / "deployments" / "prefect.yaml"


def deployments() -> list[dict]:
    from prefect.cli.deploy._models import PrefectYamlModel

    raw = yaml.safe_load(PREFECT_YAML.read_text())
    PrefectYamlModel.model_validate(raw)  # the shape `prefect deploy` accepts
    return raw["deployments"]


def test_both_deployments_are_declared_on_a_process_pool():
    declared = deployments()
    assert [d["entrypoint"] for d in declared] == [
        "flows/pipeline.py:bunny_pipeline", "flows/pipeline.py:merge_and_average"]
    assert {d["work_pool"]["name"] for d in declared} == {"bunny-gpu"}


@pytest.mark.parametrize("deployment", deployments(), ids=lambda d: d["name"])
def test_entrypoint_loads_and_default_parameters_validate(deployment, monkeypatch):
    from prefect.flows import load_flow_from_entrypoint
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools import validate

    monkeypatch.chdir(REPO)  # entrypoints are relative to the checkout, as on the worker
    flow = load_flow_from_entrypoint(deployment["entrypoint"], use_placeholder_flow=False)
    parameters = deployment["parameters"]

    schema = parameter_schema(flow).model_dump_for_openapi()
    errors = validate(parameters, schema, ignore_required=False)
    assert errors == [], [e.message for e in errors]
    validated = flow.validate_parameters(parameters)  # what the flow run itself does
    assert validated["force"] == []
    assert os.path.isabs(str(validated["config"].output_root))


def test_pipeline_deployment_is_the_tutorial_recipe():
    from flows.config import PipelineConfig

    config = PipelineConfig.model_validate(deployments()[0]["parameters"]["config"])
    assert [(r.name, r.weight) for r in config.recipes] == [("recipe-1", 0.3), ("recipe-2", 0.7)]
    assert config.recipe_settings(config.recipes[1]).unfreeze_vision_tower is True
    assert config.pretrain.hyperparameters.deepspeed == "zero2"

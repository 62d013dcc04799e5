"""The pipeline config: tutorial defaults on the command line, validation, schema."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from pydantic import ValidationError

from flows.config import PipelineConfig, RecipeHyperparameters, RecipeStage, StageData
from flows.gpus import Placement
from flows.stages import PRETRAIN, TrainJob, pipeline_jobs

TUTORIAL = Path(__file__).with_name("tutorial")
# flags whose values are paths: the pipeline fills them from its own config
PATH_FLAGS = {"model_name_or_path", "vision_tower", "data_path", "image_folder", "output_dir", "pretrain_mm_mlp_adapter"}


def tutorial_flags(script: str) -> dict[str, str]:
    """The `--flag value` pairs of the deepspeed command in one of the tutorial's scripts."""
    text = (TUTORIAL / script).read_text().replace("\\\n", " ")
    line = next(line for line in text.splitlines() if line.strip().startswith("deepspeed "))
    words = shlex.split(line.split("|")[0].replace("$MODEL_TYPE", "phi-3"))
    return flag_pairs(words[words.index("bunny/train/train.py") + 1 :])


def flag_pairs(words: list[str]) -> dict[str, str]:
    assert len(words) % 2 == 0, words
    pairs = dict(zip(words[::2], words[1::2]))
    assert all(flag.startswith("--") for flag in pairs) and len(pairs) == len(words) // 2
    return {flag[2:]: value for flag, value in pairs.items()}


def same_value(ours: str, theirs: str) -> bool:
    """Numbers compare as numbers (1e-3 == 0.001, 0. == 0), everything else as text."""
    number = re.compile(r"^-?(\d+\.?\d*|\.\d+)(e-?\d+)?$")
    if number.match(ours) and number.match(theirs):
        return float(ours) == float(theirs)
    return ours == theirs


def tutorial_config(tmp_path: Path) -> PipelineConfig:
    data = StageData(data_path=tmp_path / "d.json", image_folder=tmp_path / "images")
    return PipelineConfig.tutorial(
        output_root=tmp_path / "out", llm=tmp_path / "phi3", vision_tower=tmp_path / "siglip",
        pretrain_data=data, recipe_1_data=data, recipe_2_data=data,
    )


@pytest.mark.parametrize("stage, script", [(PRETRAIN, "pretrain.sh"), ("recipe-1", "recipe-1.sh"), ("recipe-2", "recipe-2.sh")])
def test_default_config_gives_the_tutorial_hyperparameters(tmp_path, stage, script):
    config = tutorial_config(tmp_path)
    jobs = pipeline_jobs(config, {name: Placement(devices=tuple(range(8))) for name in ("pretrain", "recipe-1", "recipe-2")})
    job = jobs[stage]
    assert isinstance(job, TrainJob)
    command = job.command({PRETRAIN: tmp_path / "out" / PRETRAIN / "output"} if stage != PRETRAIN else {}, 29501)
    ours = flag_pairs(command[command.index(next(w for w in command if w.endswith("train.py"))) + 1 :])
    theirs = tutorial_flags(script)

    assert set(ours) == set(theirs)
    hyper = {flag for flag in theirs if flag not in PATH_FLAGS}
    mismatched = {f: (ours[f], theirs[f]) for f in hyper if f != "deepspeed" and not same_value(ours[f], theirs[f])}
    assert mismatched == {}
    assert Path(ours["deepspeed"]).stem == Path(theirs["deepspeed"]).stem  # zero2 / zero3, shipped by name
    assert ours["model_name_or_path"] == str(tmp_path / "phi3")
    assert ours["output_dir"] == str(tmp_path / "out" / stage / "output")
    if stage != PRETRAIN:
        assert ours["pretrain_mm_mlp_adapter"] == str(tmp_path / "out" / PRETRAIN / "output" / "mm_projector.bin")
    launcher = command[: command.index(next(w for w in command if w.endswith("train.py")))]
    assert launcher[-4:] == ["--master_port", "29501", "--include", "localhost:0,1,2,3,4,5,6,7"]


def test_booleans_and_numbers_are_written_like_the_tutorial():
    argv = RecipeHyperparameters(max_steps=5, extra_flags={"lora_dropout": "0.1"}).to_argv()
    pairs = flag_pairs(argv)
    assert pairs["lora_enable"] == "True" and pairs["group_by_modality_length"] == "False"
    assert pairs["num_train_epochs"] == "1" and pairs["learning_rate"] == "0.0002"
    assert pairs["max_steps"] == "5" and pairs["lora_dropout"] == "0.1"
    assert "seed" not in pairs and "tune_mm_mlp_adapter" not in pairs  # None: left off


def test_recipe_overrides_apply_to_that_recipe_only(tmp_path):
    config = tutorial_config(tmp_path)
    assert config.recipe_settings(config.recipes[1]).unfreeze_vision_tower is True
    assert config.recipe_settings(config.recipes[0]).unfreeze_vision_tower is None
    assert config.config_source_recipe.name == "recipe-2"


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.update(recipes=[{**c["recipes"][0], "weight": 0.5}, c["recipes"][1]]), "sum to 1.2"),
        (lambda c: c.update(recipes=[c["recipes"][0], {**c["recipes"][1], "name": "recipe-1"}]), "unique"),
        (lambda c: c["recipes"][1].update(overrides={"lora_rank": 8}), "recipes.1.overrides.lora_rank"),
        (lambda c: c["recipes"][1].update(overrides={"lora_r": "eight"}), "recipes.1.overrides.lora_r"),
        (lambda c: c["recipes"][1].update(name="Recipe 2"), "name"),
        (lambda c: c["recipes"][1].update(name="average"), "clash with stage names"),
        (lambda c: c.update(recipes=[]), "at least 1"),
        (lambda c: c["recipe_hyperparameters"].update(extra_flags={"learning_rate": "1"}), "own fields"),
        (lambda c: c.update(postprocess={"inherit_config_from": "recipe-3"}), "not a recipe"),
        (lambda c: c.update(unknown_setting=1), "unknown_setting"),
    ],
)
def test_bad_configs_are_refused_with_a_clear_message(tmp_path, change, message):
    raw = tutorial_config(tmp_path).model_dump(mode="json")
    change(raw)
    with pytest.raises(ValidationError, match=re.escape(message) if " " in message else message):
        PipelineConfig.model_validate(raw)


def test_one_recipe_pipeline_has_no_average(tmp_path):
    config = tutorial_config(tmp_path)
    single = config.model_copy(update={"recipes": [RecipeStage(name="only", data=config.recipes[0].data, weight=1.0)]})
    assert list(pipeline_jobs(single, {})) == ["pretrain", "only", "merge-only"]


def test_flow_parameter_schema_comes_from_the_config():
    from prefect.utilities.callables import parameter_schema

    from flows.pipeline import bunny_pipeline

    schema = parameter_schema(bunny_pipeline).model_dump()
    assert schema["required"] == ["config"]
    definitions = schema["definitions"]
    recipe_fields = definitions["RecipeHyperparameters"]["properties"]
    assert recipe_fields["lora_r"]["default"] == 128 and recipe_fields["learning_rate"]["default"] == 2e-4
    assert definitions["PretrainHyperparameters"]["properties"]["save_steps"]["default"] == 24000
    assert definitions["RecipeStage"]["properties"]["weight"]["maximum"] == 1


def test_demo_config_is_small_and_cpu_friendly(tiny_assets, tmp_path):
    config = PipelineConfig.demo(tiny_assets, tmp_path, steps=9)
    for hp in [config.pretrain.hyperparameters, *map(config.recipe_settings, config.recipes)]:
        assert hp.max_steps == 9 and hp.save_steps == 3 and not hp.bf16 and not hp.tf32
    assert config.recipes[1].overrides.model_dump(exclude_none=True) == {"unfreeze_vision_tower": True}


def test_global_batch_is_kept_when_the_gpu_count_changes(tmp_path):
    """The tutorial's global batch (256 pretrain, 128 recipes) on 8 GPUs; recipes sharing an
    8-GPU host 4 + 4 accumulate twice as many micro-batches; the CPU path accumulates all."""
    config = tutorial_config(tmp_path)

    def accumulation(stage, devices):
        placements = {name: Placement(devices=tuple(range(8))) for name in ("pretrain", "recipe-1", "recipe-2")}
        job = pipeline_jobs(config, {**placements, stage: Placement(devices=devices)})[stage]
        flags = job.command({PRETRAIN: tmp_path / "out" / PRETRAIN / "output"}, 29501)
        return int(flags[flags.index("--gradient_accumulation_steps") + 1])

    assert accumulation(PRETRAIN, tuple(range(8))) == 4
    assert accumulation("recipe-1", (0, 1, 2, 3)) == 8
    assert accumulation("recipe-2", ()) == 32  # CPU: 128 / (4 x 1)
    with pytest.raises(ValueError, match="global_batch_size 128 is not a multiple of per_device_train_batch_size 4 x 3 GPUs"):
        accumulation("recipe-1", (0, 1, 2))
    hyper = config.recipe_settings(config.recipes[0]).model_copy(update={"global_batch_size": None})
    assert hyper.accumulation_steps(3) == 4  # not set: the configured value


def undescribed_fields(schema: dict, definitions: dict, path: str, seen: frozenset = frozenset()) -> list[str]:
    """Paths of the properties, at any depth, that the run form would show without a description."""
    if "$ref" in schema:
        name = schema["$ref"].split("/")[-1]
        return [] if name in seen else undescribed_fields(definitions[name], definitions, path, seen | {name})
    missing = []
    for sub in schema.get("allOf", []) + schema.get("anyOf", []):
        missing += undescribed_fields(sub, definitions, path, seen)
    if "items" in schema:
        missing += undescribed_fields(schema["items"], definitions, f"{path}[]", seen)
    for name, prop in schema.get("properties", {}).items():
        if not prop.get("description"):
            missing.append(f"{path}.{name}")
        missing += undescribed_fields(prop, definitions, f"{path}.{name}", seen)
    return missing


@pytest.mark.parametrize("flow_name", ["bunny_pipeline", "merge_and_average"])
def test_every_field_of_the_run_form_is_described(flow_name):
    import flows.pipeline
    from prefect.utilities.callables import parameter_schema

    schema = parameter_schema(getattr(flows.pipeline, flow_name)).model_dump_for_openapi()
    assert undescribed_fields(schema, schema.get("definitions", {}), "") == []
    force = schema["properties"]["force"]
    assert "average" in force["description"] and "merge-" in force["description"]
    assert any(option.get("items", {}).get("pattern") for option in force["anyOf"])  # not any string


def test_subclass_defaults_keep_their_descriptions():
    schema = RecipeHyperparameters.model_json_schema()["properties"]
    assert "shipped name" in schema["deepspeed"]["description"]
    assert "across all GPUs" in schema["global_batch_size"]["description"]
    assert schema["version"]["description"].startswith("conversation template")


def test_overrides_are_typed_and_round_trip(tmp_path):
    config = tutorial_config(tmp_path)
    overrides = RecipeStage.model_json_schema()["$defs"]["RecipeOverrides"]["properties"]
    assert overrides["learning_rate"]["anyOf"][0]["type"] == "number" and "learning rate" in overrides["learning_rate"]["description"]
    again = PipelineConfig.model_validate_json(config.model_dump_json())  # what a deployment stores and sends
    assert [again.recipe_settings(r) for r in again.recipes] == [config.recipe_settings(r) for r in config.recipes]


def test_force_refuses_what_is_not_a_stage_name(tmp_path):
    from flows.pipeline import bunny_pipeline

    config = tutorial_config(tmp_path).model_dump(mode="json")
    assert bunny_pipeline.validate_parameters({"config": config, "force": ["recipe-2"]})["force"] == ["recipe-2"]
    with pytest.raises(Exception, match="force"):
        bunny_pipeline.validate_parameters({"config": config, "force": ["Recipe 2"]})


def test_merge_input_vision_tower_reaches_the_merge_command_and_its_key(tmp_path):
    """An original-Bunny run whose mm_vision_tower is not a local folder merges with --vision-tower."""
    from flows.config import MergeAverageConfig, MergeInput
    from flows.gpus import Placement
    from flows.stages import merge_average_jobs

    def merge_job(**extra):
        config = MergeAverageConfig(
            output_root=tmp_path / "out", llm=tmp_path / "llm",
            inputs=[MergeInput(name="recipe-1", lora_path=tmp_path / "lora", weight=1.0, **extra)],
        )
        return merge_average_jobs(config, Placement())["merge-recipe-1"]

    plain, with_tower = merge_job(), merge_job(vision_tower=tmp_path / "siglip")
    (tmp_path / "lora").mkdir()
    inputs = {"recipe-1": tmp_path / "lora"}
    assert "--vision-tower" not in plain.command(inputs)
    command = with_tower.command(inputs)
    assert command[command.index("--vision-tower") + 1] == str(tmp_path / "siglip")
    assert plain.key(inputs) != with_tower.key(inputs)


@pytest.mark.parametrize("model_type, template", [("phi-3", "phi3"), ("llama", "llama3"), ("qwen2", "qwen2")])
def test_recipe_template_defaults_to_the_family_and_an_explicit_one_wins(model_type, template):
    from flows.config import RecipeHyperparameters

    def version_flag(**fields):
        argv = RecipeHyperparameters(model_type=model_type, **fields).to_argv()
        return argv[argv.index("--version") + 1]

    assert version_flag() == template
    assert version_flag(version="llama2") == "llama2"

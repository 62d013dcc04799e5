"""What each stage trains, on the real trainer built by train.py (in process, no launcher):
optimizer groups and their learning rates, LoRA placement, the learning rates in the logs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bunny.train.train import build_trainer

PROJECTOR_LR, LORA_LR = 2e-5, 2e-4
# every linear layer of the tiny Phi-3's two decoder layers, written out (not derived)
LORA_MODULES = {
    f"base_model.model.model.layers.{layer}.{module}"
    for layer in (0, 1)
    for module in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
}


def flags(assets, output_dir, *extra: str, pretrain: bool = False) -> list[str]:
    data, images = (assets.pretrain_data, assets.pretrain_images) if pretrain else (assets.recipe2_data, assets.finetune_images)
    return [
        "--model_name_or_path", str(assets.llm), "--model_type", "phi-3",
        "--vision_tower", str(assets.vision_tower), "--data_path", str(data),
        "--image_folder", str(images), "--output_dir", str(output_dir),
        "--report_to", "none", "--skip_image_check", "True", "--weight_decay", "0.1", *extra,
    ]


@pytest.fixture(scope="module")
def recipe2_trainer(tiny_assets, tmp_path_factory):
    """The tutorial's recipe-2 flags: LoRA, the vision tower unfrozen, the projector's own LR."""
    out = tmp_path_factory.mktemp("recipe2")
    trainer = build_trainer(flags(
        tiny_assets, out, "--lora_enable", "True", "--lora_r", "4", "--lora_alpha", "8",
        "--unfreeze_vision_tower", "True", "--mm_projector_lr", str(PROJECTOR_LR), "--learning_rate", str(LORA_LR),
    ))
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    return trainer


def group_members(trainer) -> dict[str, set[str]]:
    """Parameter names per optimizer group name, checked to be each in exactly one group."""
    name_of = {id(param): name for name, param in trainer.model.named_parameters()}
    members: dict[str, set[str]] = {}
    seen: list[str] = []
    for group in trainer.optimizer.param_groups:
        names = [name_of[id(param)] for param in group["params"]]
        members.setdefault(group["name"], set()).update(names)
        seen += names
    assert len(seen) == len(set(seen)), "a parameter is in two optimizer groups"
    trainable = {name for name, param in trainer.model.named_parameters() if param.requires_grad}
    assert set(seen) == trainable, "the optimizer does not hold exactly the trainable parameters"
    return members


def test_recipe2_trains_tower_and_projector_at_the_projector_lr_and_lora_at_the_lr(recipe2_trainer):
    members = group_members(recipe2_trainer)
    assert set(members) == {"lora", "mm_projector"}
    tower = {n for n in members["mm_projector"] if ".vision_tower.vision_tower." in n}
    projector = {n for n in members["mm_projector"] if ".mm_projector." in n}
    assert tower and projector and tower | projector == members["mm_projector"]
    model = recipe2_trainer.model.get_base_model()
    # The whole tower that runs (up to the feature layer); the never-run layers stay frozen.
    tower_trainable = sum(1 for p in model.get_model().vision_tower.parameters() if p.requires_grad)
    assert 0 < tower_trainable < sum(1 for _ in model.get_model().vision_tower.parameters())
    assert len(tower) == tower_trainable
    assert all(".lora_A." in n or ".lora_B." in n for n in members["lora"])
    for group in recipe2_trainer.optimizer.param_groups:
        assert group["lr"] == (PROJECTOR_LR if group["name"] == "mm_projector" else LORA_LR), group["name"]
        assert group["weight_decay"] in (0.0, 0.1)


def test_lora_sits_on_every_linear_layer_of_the_llm_and_nowhere_else(recipe2_trainer):
    with_lora = {name for name, module in recipe2_trainer.model.named_modules() if hasattr(module, "lora_A")
                 and len(getattr(module, "lora_A", {})) > 0}
    assert with_lora == LORA_MODULES


def test_every_log_line_carries_each_group_s_learning_rate(recipe2_trainer):
    recipe2_trainer.log({"loss": 1.5})
    line = json.loads((Path(recipe2_trainer.args.output_dir) / "metrics.jsonl").read_text().splitlines()[-1])
    assert line["loss"] == 1.5
    assert line["learning_rate/mm_projector"] == pytest.approx(PROJECTOR_LR)
    assert line["learning_rate/lora"] == pytest.approx(LORA_LR)
    assert recipe2_trainer.state.log_history[-1]["learning_rate/lora"] == pytest.approx(LORA_LR)
    assert recipe2_trainer.optimizer.param_groups[0]["name"] == "lora"  # HF's plain `learning_rate` is LoRA's


def test_pretrain_and_recipe1_groups(tiny_assets, tmp_path):
    pretrain = build_trainer(flags(tiny_assets, tmp_path / "p", "--tune_mm_mlp_adapter", "True", "--learning_rate", "1e-3",
                                   pretrain=True))
    pretrain.create_optimizer()
    members = group_members(pretrain)
    assert set(members) == {"mm_projector"} and all(".mm_projector." in n for n in members["mm_projector"])
    assert {group["lr"] for group in pretrain.optimizer.param_groups} == {1e-3}
    recipe1 = build_trainer(flags(tiny_assets, tmp_path / "r", "--lora_enable", "True", "--lora_r", "4",
                                  "--mm_projector_lr", str(PROJECTOR_LR), "--learning_rate", str(LORA_LR)))
    recipe1.create_optimizer()
    members = group_members(recipe1)
    assert not any("vision_tower" in n for group in members.values() for n in group)  # the tower stays frozen
    assert all(".mm_projector." in n for n in members["mm_projector"])

"""DeepSpeed checkpoints hold the trainables and optimizer state only, and resume from them.

Each case trains 4 steps with a checkpoint at step 2, then restarts from a copy of that
checkpoint alone in a fresh output folder: the resumed run must end bit-identical (weights
and AdamW state) to the uninterrupted one, with the frozen LLM and tower taken from the
stage's inputs rather than from the checkpoint. (tests/test_train.py kills a ZeRO-2 pretrain
between checkpoints; these add ZeRO-3 and a LoRA stage, two launches each.)
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bunny.train.saving import load_trainable_state
from conftest import nested_tensors, run_deepspeed

STAGE_FLAGS = {
    "pretrain": lambda a: {"tune_mm_mlp_adapter": True, "data_path": a.pretrain_data, "image_folder": a.pretrain_images},
    "lora": lambda a: {
        "lora_enable": True, "lora_r": 4, "lora_alpha": 8, "version": "phi3", "data_path": a.recipe1_data,
        "image_folder": a.finetune_images, "image_aspect_ratio": "pad", "model_max_length": 256,
    },
}
# what the stage's files and DeepSpeed's optimizer state are compared on
OUTPUT_FILES = {"pretrain": ["mm_projector.bin"], "lora": ["adapter_model.safetensors", "non_lora_trainables.bin"]}


def _args(assets, stage: str, zero: str, output_dir: Path) -> list[str]:
    flags = {
        "deepspeed": zero, "model_name_or_path": assets.llm, "model_type": "phi-3", "vision_tower": assets.vision_tower,
        "mm_projector_type": "mlp2x_gelu", "output_dir": output_dir, "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 1, "learning_rate": 1e-3, "lr_scheduler_type": "cosine", "warmup_steps": 1,
        "logging_steps": 1, "save_strategy": "steps", "save_steps": 2, "max_steps": 4, "dataloader_num_workers": 0,
        "report_to": "none", "seed": 0, **STAGE_FLAGS[stage](assets),
    }
    return [item for key, value in flags.items() for item in (f"--{key}", str(value))]


def _load(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)


def _single(checkpoint: Path, pattern: str) -> dict:
    (path,) = checkpoint.glob(f"global_step*/{pattern}")
    return torch.load(path, map_location="cpu", weights_only=False)


def _assert_ok(result) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("stage, zero", [("pretrain", "zero2"), ("pretrain", "zero3"), ("lora", "zero3")])
def test_checkpoint_holds_only_trainables_and_resumes_bit_identical(tiny_assets, tmp_path, stage, zero):
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    _assert_ok(run_deepspeed(_args(tiny_assets, stage, zero, reference), cwd=tmp_path, timeout=600))

    # what the checkpoint holds: the trainable parameters (and buffers), never a frozen weight
    checkpoint = reference / "checkpoint-2"
    states = _single(checkpoint, "*model_states.pt")
    module = states["module"]
    assert states.get("frozen_param_fragments") is None
    trained = [key for key in module if "mm_projector." in key]
    assert trained, "the projector is missing from the checkpoint"
    frozen = [key for key in module if key.endswith(".weight") and "mm_projector." not in key and "lora_" not in key]
    assert not frozen, f"frozen weights in the checkpoint: {frozen[:5]}"
    if stage == "lora":
        assert any("lora_A" in key for key in module) and any("lora_B" in key for key in module)

    shutil.copytree(checkpoint, resumed / "checkpoint-2")
    _assert_ok(run_deepspeed(_args(tiny_assets, stage, zero, resumed), cwd=tmp_path, timeout=600))

    for name in OUTPUT_FILES[stage]:
        got, expected = _load(resumed / name), _load(reference / name)
        assert got.keys() == expected.keys() and got
        assert all(torch.equal(got[key], expected[key]) for key in got), name
        if stage == "pretrain":  # the resumed run trained: its projector left the checkpoint's
            start = _load(checkpoint / name)
            assert not all(torch.equal(got[key], start[key]) for key in got)
    got = nested_tensors(_single(resumed / "checkpoint-4", "*optim_states.pt")["optimizer_state_dict"])
    expected = nested_tensors(_single(reference / "checkpoint-4", "*optim_states.pt")["optimizer_state_dict"])
    assert got.keys() == expected.keys() and any("exp_avg_sq" in key for key in got)
    assert all(torch.equal(got[key], expected[key]) for key in got)


def _half_frozen() -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    model[0].requires_grad_(False)
    return model


def test_resume_load_takes_a_state_without_frozen_weights_and_keeps_them():
    model, trained = _half_frozen(), _half_frozen()
    frozen_before = model[0].weight.clone()
    load_trainable_state({k: v for k, v in trained.state_dict().items() if k.startswith("1.")}, model)
    assert torch.equal(model[1].weight, trained[1].weight) and torch.equal(model[1].bias, trained[1].bias)
    assert torch.equal(model[0].weight, frozen_before)
    load_trainable_state(trained.state_dict(), model)  # a full checkpoint (written before this change) loads too
    assert torch.equal(model[0].weight, trained[0].weight)


@pytest.mark.parametrize("change, named", [("drop", "1.weight"), ("add", "2.weight")])
def test_resume_load_refuses_a_missing_trainable_or_an_unknown_key(change, named):
    model = _half_frozen()
    state = {k: v for k, v in model.state_dict().items() if k.startswith("1.")}
    if change == "drop":
        del state["1.weight"]
    else:
        state["2.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match=named.replace(".", r"\.")):
        load_trainable_state(state, model)

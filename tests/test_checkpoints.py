"""DeepSpeed checkpoints hold the trainables and optimizer state only, and resume from them.

Two runs cover both ZeRO stages and both kinds of checkpoint (the projector alone, and the
PEFT LoRA adapter with the projector), three and two launches:

- a ZeRO-2 pretrain (the cheapest stage, the only one whose frozen weights HF Trainer would
  write) killed between checkpoints, resumed in place past a half-written checkpoint;
- a ZeRO-3 LoRA run resumed from a copy of its checkpoint alone in a fresh output folder.

Either must end bit-identical (weights and AdamW state) to an uninterrupted run, with the frozen
LLM and tower taken from the stage's inputs rather than from the checkpoint.
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
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


def _args(assets, stage: str, zero: str, output_dir: Path, steps: int, save_steps: int) -> list[str]:
    flags = {
        "deepspeed": zero, "model_name_or_path": assets.llm, "model_type": "phi-3", "vision_tower": assets.vision_tower,
        "mm_projector_type": "mlp2x_gelu", "output_dir": output_dir, "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 1, "learning_rate": 1e-3, "lr_scheduler_type": "cosine", "warmup_steps": 1,
        "logging_steps": 1, "save_strategy": "steps", "save_steps": save_steps, "max_steps": steps,
        "dataloader_num_workers": 0, "report_to": "none", "seed": 0, **STAGE_FLAGS[stage](assets),
    }
    return [item for key, value in flags.items() for item in (f"--{key}", str(value))]


def _load(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)


def _single(checkpoint: Path, pattern: str) -> dict:
    (path,) = checkpoint.glob(f"global_step*/{pattern}")
    return torch.load(path, map_location="cpu", weights_only=False)


def _optimizer_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    return nested_tensors(_single(checkpoint, "*optim_states.pt")["optimizer_state_dict"])


def _assert_ok(result) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def assert_holds_only_trainables(checkpoint: Path, stage: str) -> None:
    """The DeepSpeed module state: the trainable parameters (and buffers), never a frozen weight."""
    states = _single(checkpoint, "*model_states.pt")
    module = states["module"]
    assert states.get("frozen_param_fragments") is None
    assert any("mm_projector." in key for key in module), "the projector is missing from the checkpoint"
    frozen = [key for key in module if key.endswith(".weight") and "mm_projector." not in key and "lora_" not in key]
    assert not frozen, f"frozen weights in the checkpoint: {frozen[:5]}"
    if stage == "lora":
        assert any("lora_A" in key for key in module) and any("lora_B" in key for key in module)


def assert_same_training_state(resumed: Path, uninterrupted: Path, files: list[str], checkpoint: str) -> None:
    """The stage's output files and a checkpoint's AdamW state, bit for bit."""
    for name in files:
        got, expected = _load(resumed / name), _load(uninterrupted / name)
        assert got.keys() == expected.keys() and got, name
        assert all(torch.equal(got[key], expected[key]) for key in got), name
    got, expected = _optimizer_state(resumed / checkpoint), _optimizer_state(uninterrupted / checkpoint)
    assert got.keys() == expected.keys() and any("exp_avg_sq" in key for key in got)
    assert all(torch.equal(got[key], expected[key]) for key in got)


@pytest.mark.slow
def test_a_zero2_pretrain_killed_between_checkpoints_resumes_to_the_same_weights_and_optimizer_state(tiny_assets, tmp_path):
    """Killed after step 4, resumed from checkpoint-3 (a half-written checkpoint-5 is skipped),
    it ends bit-identical to an uninterrupted run: projector, AdamW moments, and each step's
    loss and learning rate appear once in metrics.jsonl."""
    reference, out = tmp_path / "reference", tmp_path / "out"

    def args(output_dir: Path) -> list[str]:
        return _args(tiny_assets, "pretrain", "zero2", output_dir, steps=6, save_steps=3)

    fault = {"BUNNY_FAULT_AT_STEP": "4", "BUNNY_FAULT_ONCE_FILE": str(tmp_path / "fault-once"), "BUNNY_FAULT_ON": "log"}
    with ThreadPoolExecutor(1) as background:  # the two first runs are independent: they share the cores
        uninterrupted = background.submit(run_deepspeed, args(reference), tmp_path, None, 600)
        first = run_deepspeed(args(out), cwd=tmp_path, env=fault, timeout=600)
        _assert_ok(uninterrupted.result())
    assert_holds_only_trainables(reference / "checkpoint-3", "pretrain")
    assert first.returncode != 0 and "injected failure after step-4" in first.stdout
    assert (out / "checkpoint-3" / "trainer_state.json").is_file() and not (out / "training_complete.json").exists()
    (out / "checkpoint-5").mkdir()  # a checkpoint a crash left half-written: must be skipped
    _assert_ok(run_deepspeed(args(out), cwd=tmp_path, env=fault, timeout=600))
    done = json.loads((out / "training_complete.json").read_text())
    assert done["resumed_from"].endswith("checkpoint-3") and done["global_step"] == 6

    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    expected = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert [line["step"] for line in logged] == list(range(1, 7))  # step 4 was trained twice, logged once
    assert [line["loss"] for line in logged] == [line["loss"] for line in expected]
    assert [line["learning_rate/mm_projector"] for line in logged] == [line["learning_rate"] for line in expected]
    assert [line["learning_rate/mm_projector"] for line in logged] == [line["learning_rate"] for line in logged]

    assert_same_training_state(out, reference, ["mm_projector.bin", "checkpoint-6/mm_projector.bin"], "checkpoint-6")
    start = _load(out / "checkpoint-3" / "mm_projector.bin")  # the resumed run trained: it left the checkpoint's
    assert not all(torch.equal(value, _load(out / "mm_projector.bin")[key]) for key, value in start.items())


@pytest.mark.slow
def test_a_zero3_lora_checkpoint_resumes_alone_in_a_fresh_folder_bit_identical(tiny_assets, tmp_path):
    """4 steps with a checkpoint at step 2; a copy of that checkpoint alone, in a new output
    folder, resumes to the uninterrupted run's adapter, projector and AdamW state."""
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"

    def args(output_dir: Path) -> list[str]:
        return _args(tiny_assets, "lora", "zero3", output_dir, steps=4, save_steps=2)

    _assert_ok(run_deepspeed(args(reference), cwd=tmp_path, timeout=600))
    checkpoint = reference / "checkpoint-2"
    assert_holds_only_trainables(checkpoint, "lora")

    shutil.copytree(checkpoint, resumed / "checkpoint-2")
    _assert_ok(run_deepspeed(args(resumed), cwd=tmp_path, timeout=600))
    assert json.loads((resumed / "training_complete.json").read_text())["resumed_from"].endswith("checkpoint-2")
    assert_same_training_state(resumed, reference, ["adapter_model.safetensors", "non_lora_trainables.bin"], "checkpoint-4")


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

"""train.py's command line: legacy flags, shipped DeepSpeed configs, inconsistent flag sets."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

from bunny.train.arguments import parse_args, translate_legacy_flags
from bunny.train.ds_config import SHIPPED, resolve_deepspeed_config
from bunny.train.train import find_resume_checkpoint, stage_of
from conftest import REPO


def base_flags(assets, tmp_path, **overrides) -> list[str]:
    flags = {
        "model_name_or_path": assets.llm, "model_type": "phi-3", "version": "phi3",
        "vision_tower": assets.vision_tower, "data_path": assets.recipe1_data,
        "image_folder": assets.finetune_images, "output_dir": tmp_path / "out", "report_to": "none",
    }
    flags.update(overrides)
    return [item for key, value in flags.items() if value is not None for item in (f"--{key}", str(value))]


def test_legacy_flags_are_translated(tiny_assets, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr("bunny.train.arguments.torch.cuda.is_available", lambda: False)  # the same on any host
    argv = base_flags(tiny_assets, tmp_path) + [
        "--local_rank=0", "--evaluation_strategy", "no", "--warmup_ratio", "0.03", "--tf32", "True", "--lazy_preprocess", "True",
    ]
    with caplog.at_level(logging.WARNING):
        _, data_args, train_args = parse_args(argv)
    assert train_args.eval_strategy == "no" and train_args.warmup_steps == 0.03
    assert data_args.lazy_preprocess is True
    assert [r.getMessage() for r in caplog.records if "tf32" in r.getMessage()] == ["--tf32 ignored: no CUDA device on this machine"]
    assert translate_legacy_flags(["--local_rank", "0", "--seed", "1"]) == ["--seed", "1"]
    monkeypatch.setattr("bunny.train.arguments.torch.cuda.is_available", lambda: True)
    assert translate_legacy_flags(["--tf32", "True", "--bf16=True"]) == ["--tf32", "True", "--bf16=True"]  # kept with CUDA


@pytest.mark.parametrize("model_type, extra, template", [
    ("phi-3", ["--lora_enable", "True"], "phi3"),
    ("llama", ["--lora_enable", "True"], "llama3"),
    ("qwen2", [], "qwen2"),
    ("llama", ["--tune_mm_mlp_adapter", "True"], "plain"),
])
def test_template_defaults_to_the_family_s_for_finetuning(tiny_assets, tmp_path, model_type, extra, template):
    model_args, _, _ = parse_args(base_flags(tiny_assets, tmp_path, version=None, model_type=model_type) + extra)
    assert model_args.version == template
    given, _, _ = parse_args(base_flags(tiny_assets, tmp_path, version="llama2", model_type=model_type) + extra)
    assert given.version == "llama2"  # a template the user names is kept


def test_shipped_deepspeed_configs_by_name_or_path(tmp_path):
    assert set(SHIPPED) == {"zero2", "zero3"}
    assert resolve_deepspeed_config("zero3") == SHIPPED["zero3"].resolve()
    assert resolve_deepspeed_config("zero2.json") == SHIPPED["zero2"].resolve()
    custom = tmp_path / "mine.json"
    custom.write_text('{"zero_optimization": {"stage": 2}}')
    assert resolve_deepspeed_config(custom) == custom.resolve()
    with pytest.raises(FileNotFoundError, match="--deepspeed zero4: no such file, and not a shipped config"):
        resolve_deepspeed_config("zero4")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="--deepspeed .*broken.json: not valid JSON"):
        resolve_deepspeed_config(tmp_path / "broken.json")


@pytest.mark.parametrize(
    "overrides, extra, error, message",
    [
        ({"version": "vicuna"}, [], ValueError, "--version 'vicuna'"),
        ({"model_type": "gpt-9"}, [], ValueError, "--model_type 'gpt-9'"),
        ({"mm_projector_type": "mlp2x_relu"}, [], ValueError, "--mm_projector_type 'mlp2x_relu'"),
        ({"image_aspect_ratio": "crop"}, [], ValueError, "--image_aspect_ratio 'crop'"),
        ({"model_name_or_path": "/nonexistent/phi3"}, [], FileNotFoundError, "--model_name_or_path /nonexistent/phi3: not found"),
        ({"vision_tower": "/nonexistent/siglip"}, [], FileNotFoundError, "--vision_tower /nonexistent/siglip: not found"),
        ({"data_path": "/nonexistent/data.json"}, [], FileNotFoundError, "--data_path /nonexistent/data.json: not found"),
        ({}, ["--lora_r", "128", "--mm_projector_lr", "2e-5"], ValueError, "--lora_r, --mm_projector_lr given without --lora_enable True"),
        ({}, ["--tune_mm_mlp_adapter", "True", "--unfreeze_vision_tower", "True"], ValueError, "--unfreeze_vision_tower cannot be used in pretrain"),
        ({}, ["--tune_mm_mlp_adapter", "True", "--lora_enable", "True"], ValueError, "exclude each other"),
        ({}, ["--pretrain_mm_mlp_adapter", "/nonexistent/mm_projector.bin"], FileNotFoundError, "--pretrain_mm_mlp_adapter /nonexistent/mm_projector.bin: file not found"),
    ],
)
def test_bad_flags_fail_before_loading(tiny_assets, tmp_path, overrides, extra, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(")):
        parse_args(base_flags(tiny_assets, tmp_path, **overrides) + extra)


def test_stage_follows_from_flags(tiny_assets, tmp_path):
    model_args, _, train_args = parse_args(base_flags(tiny_assets, tmp_path) + ["--tune_mm_mlp_adapter", "True"])
    assert stage_of(model_args, train_args) == "pretrain"
    model_args, _, train_args = parse_args(base_flags(tiny_assets, tmp_path) + ["--lora_enable", "True"])
    assert stage_of(model_args, train_args) == "lora"


def test_resume_picks_the_newest_complete_checkpoint(tmp_path):
    assert find_resume_checkpoint(tmp_path / "missing") is None
    for step, complete in ((5, True), (10, True), (15, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-x").mkdir()
    assert find_resume_checkpoint(tmp_path) == tmp_path / "checkpoint-10"


def test_bad_input_stops_the_module_entry_point_before_training(tiny_assets, tmp_path):
    """`python -m bunny.train.train` works like the script, and a bad record stops it early."""
    bad = tmp_path / "bad.json"
    bad.write_text('[{"id": "rec-7", "conversations": [{"from": "robot", "value": "hi"}]}]')
    argv = base_flags(tiny_assets, tmp_path, data_path=bad)
    result = subprocess.run([sys.executable, "-m", "bunny.train.train", *argv], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "rec-7" in result.stderr and "bad.json" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def mismatched_llm(tiny_assets, tmp_path_factory):
    """The tiny LLM with a tokenizer whose offsets do not match its text (spaces vanish), and
    the ids of the recipe-1 records it cannot mask: by an independent criterion, those with a
    space inside an answer."""
    import shutil

    from test_templates import mismatched_qwen2_tokenizer

    root = tmp_path_factory.mktemp("mismatched")
    shutil.copytree(tiny_assets.llm, root / "llm")
    mismatched_qwen2_tokenizer().save_pretrained(root / "llm")
    records = json.loads(tiny_assets.recipe1_data.read_text())[:32]  # two batches of 16: a short run
    (root / "data.json").write_text(json.dumps(records))
    spaced = {r["id"] for r in records if any(" " in turn["value"].strip() for turn in r["conversations"][1::2])}
    assert 2 < len(spaced) < len(records)
    return root, spaced, len(records)


def test_mismatched_samples_are_counted_named_and_stop_the_run_past_the_budget(tiny_assets, tmp_path, mismatched_llm):
    """A real (in-process) training run: the trainer pops `mismatched_ids` from its batches;
    within floor(fraction x records) the run completes and names every mismatched sample;
    past it the run fails, naming them, with the report written."""
    from bunny.train.train import train
    from bunny.train.trainer import TokenizationMismatchError

    root, spaced, total = mismatched_llm

    def flags(output_dir, fraction: float) -> list[str]:
        return base_flags(tiny_assets, tmp_path, model_name_or_path=root / "llm", data_path=root / "data.json",
                          version="qwen2", output_dir=output_dir) + [
            "--lora_enable", "True", "--lora_r", "4", "--per_device_train_batch_size", "16", "--num_train_epochs", "1",
            "--skip_image_check", "True", "--save_strategy", "no", "--dataloader_num_workers", "0",
            "--max_mismatch_fraction", str(fraction),
        ]

    # budget floor(fraction x total) = len(spaced): just enough
    out = train(flags(tmp_path / "within", (len(spaced) + 0.5) / total))
    report = json.loads((out / "tokenization_mismatches.json").read_text())
    assert report["count"] == len(spaced) and set(report["ids"]) == spaced
    assert json.loads((out / "training_complete.json").read_text())["tokenization_mismatches"] == len(spaced)

    budget = len(spaced) - 2
    with pytest.raises(TokenizationMismatchError, match=rf"samples could not be masked \(budget {budget}, "):
        train(flags(tmp_path / "fails", (budget + 0.5) / total))
    report = json.loads((tmp_path / "fails" / "tokenization_mismatches.json").read_text())
    assert report["count"] > budget and len(report["ids"]) == report["count"] and set(report["ids"]) <= spaced
    assert not (tmp_path / "fails" / "training_complete.json").exists()

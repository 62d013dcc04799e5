"""The throughput benchmark: its pieces (fast) and one ``--tiny`` run through deepspeed (slow)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bunny.bench.compare import compare, read_json_lines
from bunny.bench.shapes import REFERENCE, TINY
from bunny.bench.stages import STAGES, scaled, train_argv
from bunny.bench.synthetic import StageData, exact_length_text
from bunny.bench.throughput import parse_args, summarize
from bunny.model.builder import resolve_attn_implementation
from bunny.tiny.tokenizer import build_tiny_tokenizer
from bunny.train.callbacks import STEP_TIMING_FILE, StepTimingCallback
from bunny.train.zero3 import fetch_whole_layers_under_zero3, transformer_layer_classes
from conftest import REPO

CLEAN_LOOP = REPO / "scripts" / "clean_loop.py"


def _clean_loop_module():
    spec = importlib.util.spec_from_file_location("clean_loop_copy", CLEAN_LOOP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reference_shapes_and_flops_are_the_clean_loops():
    clean = _clean_loop_module()
    assert {k: REFERENCE.llm[k] for k in clean.PHI3} == clean.PHI3
    assert {k: REFERENCE.vision[k] for k in clean.SIGLIP} == clean.SIGLIP
    llm_params, vision_params = REFERENCE.parameter_counts
    assert round(llm_params / 1e9, 2) == 3.82 and round(vision_params / 1e9, 3) == 0.428
    # clean_loop.py: flops = bs * (2*Nv*n_img + 4*N*T + 4*H*V*T), N = LLM params without embeddings
    hidden, vocab, image_tokens, sequence = 3072, 32064, 729, 793
    expected = 2 * vision_params * image_tokens + 4 * (llm_params - 2 * vocab * hidden) * sequence + 4 * hidden * vocab * sequence
    assert REFERENCE.model_flops_per_sample(sequence) == expected
    assert REFERENCE.model_flops_per_sample(sequence, vision_trains=True) == expected + 4 * vision_params * image_tokens


@pytest.mark.parametrize("template, target", [("plain", 64), ("phi3", 320)])
def test_synthetic_text_has_the_exact_token_length(template, target):
    tokenizer = build_tiny_tokenizer(add_bos=True)
    texts = {exact_length_text(template, target, tokenizer, seed, 4096) for seed in range(3)}
    assert len(texts) == 3  # different texts, same length
    from bunny.bench.synthetic import _text_tokens

    for text, supervised in texts:
        assert _text_tokens(template, text, tokenizer, 4096) == (target, supervised)
        assert 0 < supervised < target


def test_summary_skips_warmup_and_counts_like_the_clean_loop():
    steps = [{"step": i + 1, "wall_s": wall, "data_wait_s": wait, "peak_bytes": peak}
             for i, (wall, wait, peak) in enumerate([(9.0, 5.0, 40 * 2**30), (0.5, 0.05, 11 * 2**30), (0.5, 0.05, 12 * 2**30)])]
    timing = {"device": "NVIDIA H200", "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "steps": steps}
    data = StageData(Path("d.json"), Path("img"), 24, 64, 63)
    row = summarize(STAGES["pretrain"], timing, REFERENCE, data, warmup=1)
    assert row["steps_measured"] == 2 and row["seq"] == 793
    assert row["samples_per_s"] == 16.0 and row["tokens_per_s"] == 16 * 793
    assert row["model_tflops"] == round(REFERENCE.model_flops_per_sample(793) * 16 / 1e12, 1)
    assert row["peak_gib"] == 12.0 and row["data_wait_s"] == 0.05 and row["data_wait_pct"] == 10.0
    with pytest.raises(ValueError, match="none left after 3 warm-up steps"):
        summarize(STAGES["pretrain"], timing, REFERENCE, data, warmup=3)


def test_compare_gives_ratios_to_the_matching_ceiling_and_fast_gains(tmp_path):
    clean = tmp_path / "clean.jsonl"
    clean.write_text("warning: not json\n" + "\n".join(json.dumps(row) for row in [
        {"setting": "pretrain", "ckpt": True, "batch": 8, "samples_per_s": 20.0, "device": "H200"},
        {"setting": "pretrain", "ckpt": False, "batch": 8, "samples_per_s": 25.0, "device": "H200"},
        {"setting": "lora", "ckpt": True, "batch": 4, "samples_per_s": 10.0, "device": "H200"},
    ]) + "\n")
    base = {"device": "H200", "seq": 793, "model_tflops": 1.0, "peak_gib": 10.0, "data_wait_pct": 0.1}
    ours = [
        {**base, "stage": "pretrain", "setting": "pretrain", "profile": "tutorial", "deepspeed": "zero2", "ckpt": True, "batch": 8, "samples_per_s": 19.0},
        {**base, "stage": "pretrain_fast", "setting": "pretrain", "profile": "fast", "deepspeed": "zero2", "ckpt": False, "batch": 8, "samples_per_s": 24.7},
        {**base, "stage": "lora_unfrozen", "setting": "lora", "profile": "tutorial", "deepspeed": "zero3", "ckpt": True, "batch": 4, "samples_per_s": 8.0, "unfreeze_vision_tower": True},
        {"stage": "lora", "error": "train.py exited with 1"},
    ]
    summary = {row["stage"]: row for row in compare(read_json_lines(clean), ours)}
    assert summary["pretrain"]["ratio_to_clean"] == 0.95
    assert summary["pretrain_fast"]["ratio_to_clean"] == 0.988 and summary["pretrain_fast"]["fast_gain"] == 1.3
    assert "ratio_to_clean" not in summary["lora_unfrozen"]  # the clean loop never trains the tower
    assert summary["lora"] == {"stage": "lora", "missing": "train.py exited with 1"}


def test_stage_table_and_arguments():
    assert list(STAGES)[:2] == ["pretrain", "lora"]
    assert STAGES["pretrain"].deepspeed == "zero2" and STAGES["lora"].deepspeed == "zero3"
    assert all(s.deepspeed == "zero2" and not s.gradient_checkpointing for s in STAGES.values() if s.profile == "fast")
    assert scaled(STAGES["lora_fast"], 2).micro_batch == 8 and scaled(STAGES["lora"], 2).micro_batch == 4
    from bunny.bench.assets import BenchModels

    data = StageData(Path("d.json"), Path("img"), 24, 320, 278)
    argv = train_argv(STAGES["lora_module_hooks"], BenchModels(Path("llm"), Path("vt")), data, Path("out"), 11, 4)
    flags = dict(zip(argv[::2], argv[1::2]))
    assert flags["--zero3_layer_fetch"] == "False" and flags["--deepspeed"] == "zero3" and flags["--lora_r"] == "128"
    assert flags["--gradient_checkpointing"] == "True" and flags["--per_device_train_batch_size"] == "4"
    args = parse_args(["--tiny"])
    assert (args.shapes, args.steps, args.warmup, args.workers) == ("tiny", 3, 2, 1)
    with pytest.raises(SystemExit):
        parse_args(["--stages", "pretrain,nonsense"])


def test_step_timing_is_off_unless_asked_and_records_steps(tmp_path, monkeypatch):
    monkeypatch.delenv(StepTimingCallback.ENV, raising=False)
    assert StepTimingCallback.from_env(tmp_path) is None
    monkeypatch.setenv(StepTimingCallback.ENV, "1")
    timer = StepTimingCallback.from_env(tmp_path)

    class State:
        global_step = 0
        is_world_process_zero = True

    class Args:
        world_size, per_device_train_batch_size, gradient_accumulation_steps, gradient_checkpointing = 1, 4, 2, True

    timer.on_train_begin(Args, State, None)
    for step in (1, 2):
        with timer.waiting_for_data():
            pass
        State.global_step = step
        timer.on_step_end(Args, State, None)
    timer.on_train_end(Args, State, None)
    record = json.loads((tmp_path / STEP_TIMING_FILE).read_text())
    assert [s["step"] for s in record["steps"]] == [1, 2]
    assert all(s["wall_s"] >= s["data_wait_s"] >= 0 for s in record["steps"])
    assert record["gradient_accumulation_steps"] == 2 and record["device"] == "cpu"


def test_attention_and_zero3_choices_on_a_cpu(tiny_assets):
    from transformers.utils import is_flash_attn_2_available

    assert resolve_attn_implementation("auto", torch.float32) == "sdpa"
    expected = "flash_attention_2" if is_flash_attn_2_available() else "sdpa"
    assert resolve_attn_implementation("auto", torch.bfloat16) == resolve_attn_implementation("auto", torch.float16) == expected
    assert resolve_attn_implementation("eager", torch.bfloat16) == "eager"
    from bunny.model.builder import build_bunny_model

    model = build_bunny_model(tiny_assets.llm, "phi-3", tiny_assets.vision_tower, "mlp2x_gelu")
    assert [cls.__name__ for cls in transformer_layer_classes(model)] == ["Phi3DecoderLayer", "SiglipEncoderLayer"]
    assert fetch_whole_layers_under_zero3(model) == []  # no ZeRO-3 config active


@pytest.mark.slow
def test_tiny_benchmark_runs_pretrain_and_lora_through_deepspeed(tmp_path):
    """The fewest steps that still measure: one warm-up step, two measured (an average of more
    than one), the data loaded in the training process (the worker path is the tutorial's, run
    by tests/test_train.py)."""
    out = tmp_path / "bench.jsonl"
    result = subprocess.run(
        [sys.executable, "-m", "bunny.bench.throughput", "--tiny", "--stages", "pretrain,lora", "--work-dir",
         str(tmp_path / "work"), "--cache-dir", str(tmp_path / "cache"), "--json-out", str(out),
         "--warmup", "1", "--steps", "2", "--workers", "0"],
        cwd=REPO, capture_output=True, text=True, timeout=1200,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = {row["stage"]: row for row in read_json_lines(out)}
    assert set(rows) == {"pretrain", "lora"}
    for name, seq, batch in (("pretrain", 729 + 64, 8), ("lora", 729 + 320, 4)):
        row = rows[name]
        assert (row["seq"], row["batch"], row["steps_measured"], row["device"]) == (seq, batch, 2, "cpu")
        # samples/s is rounded to 0.01, tokens/s to 1: a slow (loaded) machine's 0.19 samples/s is 1-3% off
        assert row["samples_per_s"] > 0 and row["samples_per_s"] == pytest.approx(row["tokens_per_s"] / seq, abs=0.005 + 0.5 / seq)
        assert row["model_tflops"] > 0 and 0 <= row["data_wait_s"] < row["step_s"]
        assert row["peak_gib"] is None  # no GPU
        timing = json.loads((tmp_path / "work" / name / STEP_TIMING_FILE).read_text())
        assert len(timing["steps"]) == 3  # 1 warm-up + 2 measured
    assert rows["pretrain"]["deepspeed"] == "zero2" and rows["lora"]["deepspeed"] == "zero3"
    assert "fetched per layer for Phi3DecoderLayer, SiglipEncoderLayer" in (tmp_path / "work" / "lora" / "train.log").read_text()

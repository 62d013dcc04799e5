"""Warnings whose cause is ours stay out of the stage logs: transformers 5's deprecation of the
tutorial's --gradient_checkpointing, DeepSpeed guessing the CPU accelerator."""

from __future__ import annotations

import dataclasses
import warnings

from bunny.train.arguments import parse_args
from test_train_args import base_flags


def test_gradient_checkpointing_parses_without_a_future_warning(tiny_assets, tmp_path):
    argv = base_flags(tiny_assets, tmp_path) + ["--gradient_checkpointing", "True"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        _, _, train_args = parse_args(argv)
        assert train_args.gradient_checkpointing is True  # what the trainer and our callbacks read
        assert train_args.activation_checkpointing is True
        dataclasses.replace(train_args)  # the trainer's copies of the arguments warn neither


def test_training_stages_on_the_cpu_name_deepspeeds_accelerator(tiny_assets, tmp_path):
    from flows.config import PipelineConfig
    from flows.gpus import Placement
    from flows.stages import pipeline_jobs

    config = PipelineConfig.demo(tiny_assets, tmp_path / "out", steps=2)
    on_cpu = pipeline_jobs(config, {})
    assert on_cpu["pretrain"].environment()["DS_ACCELERATOR"] == "cpu"
    on_gpus = pipeline_jobs(config, {"pretrain": Placement(devices=(0, 1))})
    assert "DS_ACCELERATOR" not in on_gpus["pretrain"].environment()  # DeepSpeed detects CUDA itself

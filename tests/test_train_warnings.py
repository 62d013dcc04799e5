"""The tutorial's flags parse without transformers 5's deprecation warnings in the stage logs."""

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

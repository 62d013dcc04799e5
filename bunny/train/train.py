"""Train one Bunny stage: ``deepspeed bunny/train/train.py <tutorial flags>``.

The stage follows from the flags:
  pretrain  ``--tune_mm_mlp_adapter True``  only the projector trains;
  lora      ``--lora_enable True``          LoRA on every LLM linear + the projector
                                            (+ the vision tower with ``--unfreeze_vision_tower``);
  full      neither                         the whole LLM + the projector (+ tower).

Everything that can be wrong with the input is checked before the model is loaded. A run
resumes from the newest complete ``checkpoint-*`` in ``--output_dir``, and ends by writing
``training_complete.json`` there, last.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file (deepspeed bunny/train/train.py): import the package, not siblings
    sys.path[0] = str(Path(__file__).resolve().parents[2])

if __name__ == "__main__" and {"-h", "--help"} & set(sys.argv[1:]):  # before the heavy imports below
    from bunny.train.help_cache import print_help

    print_help(sys.argv[1:])
    sys.exit(0)

import torch
from transformers import AutoImageProcessor, AutoTokenizer, set_seed

from bunny.cli import UserError, run_cli
from bunny.conversation import TemplateMismatchError, check_template_fits
from bunny.data import DataCollator, DataValidationError, SupervisedDataset, validate_dataset
from bunny.data.validation import VALIDATION_RECORD_ENV
from bunny.model.builder import build_bunny_model
from bunny.train.arguments import DataArguments, ModelArguments, TrainingArguments, parse_args
from bunny.train.callbacks import FaultInjectionCallback, ProgressFileCallback, StepTimingCallback
from bunny.train.trainer import BunnyTrainer
from bunny.train.zero3 import fetch_whole_layers_under_zero3

logger = logging.getLogger("bunny.train")
COMPLETE_FILE = "training_complete.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def stage_of(model_args: ModelArguments, train_args: TrainingArguments) -> str:
    if model_args.tune_mm_mlp_adapter:
        return "pretrain"
    return "lora" if train_args.lora_enable else "full"


def find_resume_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest checkpoint that was saved completely (its trainer_state.json is written
    last by the Trainer); a folder left half-written by a crash is skipped."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    complete = [
        (int(match.group(1)), path)
        for path in output_dir.iterdir()
        if (match := _CHECKPOINT.match(path.name)) and (path / "trainer_state.json").is_file()
    ]
    return max(complete)[1] if complete else None


def lora_target_regex(model: torch.nn.Module) -> str:
    """A regex over every linear layer of the LLM's decoder layers: the vision tower,
    projector and lm_head are excluded (LoRA is for the language model only)."""
    suffixes = sorted(
        {
            match.group(1)
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and (match := re.match(r"^model\.layers\.\d+\.(.+)$", name))
        }
    )
    if not suffixes:
        raise ValueError("no linear layers found under model.layers: cannot place LoRA adapters")
    return r"model\.layers\.\d+\.(?:" + "|".join(re.escape(s) for s in suffixes) + ")"


def set_trainable(model, model_args: ModelArguments, train_args: TrainingArguments, stage: str):
    """Freeze/unfreeze by stage; wrap with PEFT for LoRA. Returns the model to train."""
    if stage in ("pretrain", "lora"):
        model.requires_grad_(False)
    if stage == "lora":
        from peft import LoraConfig, get_peft_model

        lora_config = LoraConfig(
            r=train_args.lora_r,
            lora_alpha=train_args.lora_alpha,
            lora_dropout=train_args.lora_dropout,
            bias=train_args.lora_bias,
            target_modules=lora_target_regex(model),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora_config)
    bunny = model.get_base_model() if stage == "lora" else model
    bunny.get_model().mm_projector.requires_grad_(True)
    bunny.get_model().vision_tower.requires_grad_(model_args.unfreeze_vision_tower)
    return model


def generation_stop_ids(model_path: str | Path) -> list[int]:
    """EOS ids the base model's ``generation_config.json`` / ``config.json`` declare (a list for
    instruct models that stop on several tokens): a template may end answers with any of them."""
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        path = Path(model_path) / name
        if path.is_file():
            eos = json.loads(path.read_text()).get("eos_token_id")
            ids += eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else []
    return ids


def load_processors(model_args: ModelArguments, train_args: TrainingArguments):
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.model_name_or_path, model_max_length=train_args.model_max_length, padding_side="right"
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    image_processor = AutoImageProcessor.from_pretrained(model_args.vision_tower)
    return tokenizer, image_processor


def build_trainer(argv: list[str]) -> BunnyTrainer:
    """Parse and check the flags, validate the data, load the model and wrap it in the
    stage's trainer: everything but the training itself."""
    model_args, data_args, train_args = parse_args(argv)
    set_seed(train_args.seed)  # before the model is built: new LoRA and projector weights are drawn from it
    stage = stage_of(model_args, train_args)
    output_dir = Path(train_args.output_dir)

    tokenizer, image_processor = load_processors(model_args, train_args)
    check_template_fits(model_args.version, tokenizer, generation_stop_ids(model_args.model_name_or_path))
    records = validate_dataset(
        data_args.data_path,
        data_args.image_folder,
        model_args.version,
        check_images=not data_args.skip_image_check,
        workers=data_args.validation_workers,
        validation_record=os.environ.get(VALIDATION_RECORD_ENV),  # set by the flow after its preflight
    )
    dtype = torch.bfloat16 if train_args.bf16 else torch.float16 if train_args.fp16 else torch.float32
    model = build_bunny_model(
        model_args.model_name_or_path,
        model_args.model_type,
        model_args.vision_tower,
        model_args.mm_projector_type,
        model_args.mm_vision_select_layer,
        model_args.pretrain_mm_mlp_adapter,
        dtype=dtype,
        attn_implementation=model_args.attn_implementation,
    )
    model.config.use_cache = False
    model.config.image_aspect_ratio = data_args.image_aspect_ratio
    model.config.tokenizer_model_max_length = train_args.model_max_length
    model.config.tokenizer_padding_side = tokenizer.padding_side
    model.config.unfreeze_vision_tower = model_args.unfreeze_vision_tower
    model.config.mm_projector_lr = train_args.mm_projector_lr
    model = set_trainable(model, model_args, train_args, stage)
    if train_args.zero3_layer_fetch:
        fetch_whole_layers_under_zero3(model)
    if train_args.gradient_checkpointing and train_args.gradient_checkpointing_kwargs is None:
        non_reentrant = {"use_reentrant": False}
        train_args.gradient_checkpointing_kwargs = non_reentrant
        if hasattr(train_args, "activation_checkpointing_kwargs"):  # the name transformers 5.x reads (no warning)
            train_args.activation_checkpointing_kwargs = non_reentrant

    dataset = SupervisedDataset(
        data_args.data_path,
        tokenizer,
        image_processor,
        model_args.version,
        data_args.image_folder,
        data_args.image_aspect_ratio,
        train_args.model_max_length,
        records=records,  # already loaded (and checked) by the validation pass
    )
    callbacks = [ProgressFileCallback(output_dir)]
    if fault := FaultInjectionCallback.from_env():
        callbacks.append(fault)
    if step_timing := StepTimingCallback.from_env(output_dir):
        callbacks.append(step_timing)
    return BunnyTrainer(
        model=model,
        args=train_args,
        train_dataset=dataset,
        data_collator=DataCollator(tokenizer),
        processing_class=tokenizer,
        image_processor=image_processor,
        callbacks=callbacks,
        stage=stage,
        max_mismatches=math.floor(data_args.max_mismatch_fraction * len(dataset)),
        step_timing=step_timing,
    )


def train(argv: list[str]) -> Path:
    trainer = build_trainer(argv)
    output_dir = Path(trainer.args.output_dir)
    resume = find_resume_checkpoint(output_dir)
    if resume is not None:
        logger.warning("resuming from %s", resume)
    started = time.time()
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    trainer.save_state()
    trainer.save_model(str(output_dir))
    trainer.write_mismatch_report()
    if trainer.args.should_save:
        write_completion(trainer, output_dir, trainer.stage, result.training_loss, time.time() - started, resume)
    return output_dir


def write_completion(trainer: BunnyTrainer, output_dir: Path, stage: str, train_loss: float, seconds: float, resumed_from) -> None:
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    record = {
        "stage": stage,
        "global_step": trainer.state.global_step,
        "max_steps": trainer.state.max_steps,
        "final_loss": losses[-1] if losses else None,
        "train_loss": train_loss,
        "seconds": round(seconds, 2),
        "resumed_from": str(resumed_from) if resumed_from else None,
        "tokenization_mismatches": len(trainer.mismatched_ids),
    }
    tmp = output_dir / f".{COMPLETE_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(output_dir / COMPLETE_FILE)


def _check_flags(argv: list[str]) -> None:
    """Parse the flags once, quietly, so that a bad one is reported as a user error (`train`
    parses them again: `parse_args` raises plain ValueError/FileNotFoundError, which inside
    training would be unexpected failures that must keep their traceback)."""
    logging.disable(logging.WARNING)
    try:
        parse_args(argv)
    except (ValueError, FileNotFoundError) as error:
        raise UserError(str(error)) from error
    finally:
        logging.disable(logging.NOTSET)


def main(argv: list[str] | None = None) -> int:
    """Bad flags and bad data end in one ``train: error: ...`` line (+ one line per data problem)
    and exit status 2; BUNNY_DEBUG=1 shows their traceback (``--debug`` is a transformers flag)."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    argv = sys.argv[1:] if argv is None else argv

    def body() -> None:
        _check_flags(argv)
        try:
            train(argv)
        except DataValidationError as error:
            raise error.as_user_error() from error
        except TemplateMismatchError as error:
            raise UserError(str(error)) from error

    return run_cli("train", body)


if __name__ == "__main__":
    sys.exit(main())

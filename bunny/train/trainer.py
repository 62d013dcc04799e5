"""HF Trainer with Bunny's three additions: a projector learning rate, modality-grouped
batches, and saves that hold only the stage's trainable weights."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import Trainer
from transformers.trainer_pt_utils import get_parameter_names

from bunny.data.sampler import ModalityLengthGroupedSampler
from bunny.train.saving import save_lora, save_projector


class TokenizationMismatchError(RuntimeError):
    pass


class BunnyTrainer(Trainer):
    """``stage`` is ``"pretrain"`` (projector only), ``"lora"`` or ``"full"``."""

    def __init__(self, *args, stage: str, max_mismatches: int, image_processor=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.stage = stage
        self.image_processor = image_processor
        self.max_mismatches = max_mismatches
        self.mismatched_ids: list[str] = []

    # --- data -----------------------------------------------------------------------
    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if not self.args.group_by_modality_length:
            return super()._get_train_sampler(dataset)
        return ModalityLengthGroupedSampler(
            lengths=dataset.modality_lengths,
            batch_size=self.args.train_batch_size,
            world_size=self.args.world_size * self.args.gradient_accumulation_steps,
            seed=self.args.seed,
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._record_mismatches(inputs.pop("mismatched_ids", []))
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def _record_mismatches(self, ids: list[str]) -> None:
        """Samples whose masking failed carry no trained labels; count and name them, and
        stop the run once they exceed the budget (``--max_mismatch_fraction``)."""
        if not ids:
            return
        self.mismatched_ids.extend(ids)
        if len(self.mismatched_ids) > self.max_mismatches:
            self.write_mismatch_report()
            raise TokenizationMismatchError(
                f"{len(self.mismatched_ids)} samples could not be masked (budget {self.max_mismatches}, "
                f"--max_mismatch_fraction); first ids: {self.mismatched_ids[:20]}; "
                f"all in {Path(self.args.output_dir) / 'tokenization_mismatches.json'}"
            )

    def write_mismatch_report(self) -> None:
        if self.args.should_save:
            path = Path(self.args.output_dir) / "tokenization_mismatches.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"count": len(self.mismatched_ids), "ids": self.mismatched_ids}, indent=1))

    # --- optimisation ---------------------------------------------------------------
    def create_optimizer(self, model=None):
        """AdamW groups: weight decay off for biases and norms (as HF), and the projector at
        ``--mm_projector_lr`` when set."""
        if self.optimizer is not None:
            return self.optimizer
        model = self.model
        decay = set(get_parameter_names(model, [torch.nn.LayerNorm], ["bias", "layernorm", "rmsnorm", "norm"]))
        projector_lr = self.args.mm_projector_lr
        groups: dict[tuple[bool, bool], list] = {}
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            is_projector = projector_lr is not None and "mm_projector." in name
            groups.setdefault((name in decay, is_projector), []).append(param)
        param_groups = []
        for (decays, is_projector), params in sorted(groups.items()):
            group = {"params": params, "weight_decay": self.args.weight_decay if decays else 0.0}
            if is_projector:
                group["lr"] = projector_lr
            param_groups.append(group)
        optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, model)
        self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        return self.optimizer

    # --- saving ---------------------------------------------------------------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        output_dir = Path(output_dir or self.args.output_dir)
        if self.stage == "pretrain":
            save_projector(self.model, output_dir, self.args.should_save)
        elif self.stage == "lora":
            processors = [p for p in (self.processing_class, self.image_processor) if p is not None]
            save_lora(self.model, output_dir, self.args.should_save, processors)
        else:
            super().save_model(str(output_dir), _internal_call)

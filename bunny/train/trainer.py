"""HF Trainer with Bunny's three additions: a projector learning rate, modality-grouped
batches, and saves that hold only the stage's trainable weights."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import Trainer
from transformers.trainer_pt_utils import get_parameter_names

from bunny.data.sampler import ModalityLengthGroupedSampler
from bunny.train.callbacks import StepTimingCallback
from bunny.train.saving import save_lora, save_projector


class TokenizationMismatchError(RuntimeError):
    pass


class BunnyTrainer(Trainer):
    """``stage`` is ``"pretrain"`` (projector only), ``"lora"`` or ``"full"``. With
    ``step_timing`` (also among the callbacks), batch fetching is timed as data wait."""

    def __init__(
        self,
        *args,
        stage: str,
        max_mismatches: int,
        image_processor=None,
        step_timing: StepTimingCallback | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.stage = stage
        self.image_processor = image_processor
        self.max_mismatches = max_mismatches
        self.mismatched_ids: list[str] = []
        self.step_timing = step_timing
        self._flop_parameters: int | None = None

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

    def get_batch_samples(self, *args, **kwargs):
        if self.step_timing is None:
            return super().get_batch_samples(*args, **kwargs)
        with self.step_timing.waiting_for_data():
            return super().get_batch_samples(*args, **kwargs)

    def floating_point_ops(self, inputs) -> int:
        """HF's estimate for ``total_flos`` (6 x input ids x non-embedding parameters), with the
        parameters counted once: HF recounts them, walking every module, at each micro-batch
        (~4 ms of host time per micro-batch for a LoRA model of Bunny-4B's depth)."""
        if self._flop_parameters is None:
            count = getattr(self.model, "num_parameters", None)
            self._flop_parameters = count(exclude_embeddings=True) if count is not None else 0
        input_ids = inputs.get("input_ids")
        return 6 * input_ids.numel() * self._flop_parameters if input_ids is not None else 0

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

"""HF Trainer with Bunny's additions: named optimizer groups (the projector and an unfrozen
vision tower at ``--mm_projector_lr``), each group's learning rate in every log line,
modality-grouped batches, the tokenization-mismatch budget, and saves (model files and
DeepSpeed checkpoints alike) that hold only the stage's trainable weights."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from bunny.data.sampler import ModalityLengthGroupedSampler
from bunny.train.callbacks import StepTimingCallback
from bunny.train.saving import load_trainable_state, save_lora, save_projector


PROJECTOR_GROUP = "mm_projector"  # the projector (+ an unfrozen vision tower), at --mm_projector_lr


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
        self.optimizer_group_names: list[str] = []
        self._applied_learning_rates: dict[str, float] = {}
        self.add_callback(_RecordAppliedLearningRates(self))

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
        """AdamW over named groups, as the original Bunny's trainer groups them:

        * ``mm_projector``: the projector, and the vision tower when it is unfrozen, at
          ``--mm_projector_lr`` (at ``--learning_rate`` when that flag is not given);
        * ``lora`` (LoRA stage) or ``trainable`` (other stages): everything else, at ``--learning_rate``.

        Each is split into a weight-decay and a no-decay group (biases and norms, as HF does).
        """
        if self.optimizer is not None:
            return self.optimizer
        decay = set(self.get_decay_parameter_names(self.model))
        groups: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                groups.setdefault((self.optimizer_group_of(name), name in decay), []).append(param)
        param_groups = []
        # the main group first: HF's plain `learning_rate` (group 0's) is then --learning_rate's
        for (group_name, decays), params in sorted(groups.items(), key=lambda item: (item[0][0] == PROJECTOR_GROUP, item[0])):
            group = {"name": group_name, "params": params, "weight_decay": self.args.weight_decay if decays else 0.0}
            if group_name == PROJECTOR_GROUP and self.args.mm_projector_lr is not None:
                group["lr"] = self.args.mm_projector_lr
            param_groups.append(group)
        optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, self.model)
        self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        self.optimizer_group_names = [group["name"] for group in param_groups]
        return self.optimizer

    def optimizer_group_of(self, parameter_name: str) -> str:
        """The optimizer group a trainable parameter belongs to (see :meth:`create_optimizer`)."""
        if "mm_projector." in parameter_name or "vision_tower." in parameter_name:
            return PROJECTOR_GROUP
        return "lora" if self.stage == "lora" else "trainable"

    def group_learning_rates(self) -> dict[str, float]:
        """``{"learning_rate/<group>": lr}``, the current learning rate of each named group."""
        if self.optimizer is None or not self.optimizer_group_names:
            return {}
        try:  # the scheduler's view, which HF's own `learning_rate` reports (group 0's)
            rates = list(self.lr_scheduler.get_last_lr())
        except (AttributeError, AssertionError):  # no scheduler yet, or DeepSpeed's before its first step
            rates = []
        if len(rates) != len(self.optimizer_group_names):
            rates = [group["lr"] for group in self.optimizer.param_groups]
        return {f"learning_rate/{name}": lr.item() if torch.is_tensor(lr) else lr
                for name, lr in zip(self.optimizer_group_names, rates)}

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Every log line also carries each optimizer group's learning rate: the one the last
        optimizer step applied, as HF's plain ``learning_rate`` (the first group's) reports it."""
        super().log({**logs, **(self._applied_learning_rates or self.group_learning_rates())}, start_time)

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

    # --- checkpoints ----------------------------------------------------------------
    # A DeepSpeed checkpoint (`global_step*/`) holds the module's state dict and, under ZeRO,
    # the fp32 partitions of the trainable parameters with their AdamW moments. HF Trainer
    # leaves the frozen weights out only for PEFT models: a pretrain checkpoint would hold the
    # whole frozen LLM and tower (7.9 GiB at Bunny-4B's shapes; under ZeRO-2 and -3 DeepSpeed
    # adds them again as "frozen fragments"). Frozen weights are what the stage loads from its
    # inputs at start, so a resumed run has them already: every stage's checkpoints hold the
    # trainable parameters, buffers and optimizer state only, and resume loads them checked.
    _exclude_frozen = True  # private switch: False writes the full checkpoints HF would (what the tests must catch)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.is_deepspeed_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)
        from accelerate.utils import DeepSpeedSchedulerWrapper
        from transformers.trainer import SCHEDULER_NAME

        self.model_wrapped.save_checkpoint(output_dir, exclude_frozen_parameters=self._exclude_frozen)
        # DeepSpeed saves its own scheduler (HF's, wrapped); any other is saved as HF does
        if self.args.should_save and not isinstance(self.lr_scheduler, DeepSpeedSchedulerWrapper):
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        """HF resumes a DeepSpeed run with a strict module load for non-PEFT models, which a
        checkpoint without the frozen weights fails, and a blind non-strict one for PEFT models.
        Here every stage loads its checkpoint with :func:`load_trainable_state`: the frozen
        weights may be absent, nothing else."""
        if not (self.is_deepspeed_enabled and resume_from_checkpoint is not None):
            return super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        model, train_dataloader = super()._prepare_for_training(max_steps, train_dataloader, None)
        if not list(Path(resume_from_checkpoint).glob("global_step*")):
            raise ValueError(f"{resume_from_checkpoint}: no DeepSpeed checkpoint (global_step*) to resume from")
        load_path, _ = self.model_wrapped.load_checkpoint(
            resume_from_checkpoint, load_optimizer_states=True, load_lr_scheduler_states=True,
            custom_load_fn=load_trainable_state,
        )
        if load_path is None:
            raise ValueError(f"DeepSpeed could not resume from {resume_from_checkpoint}")
        self._load_optimizer_and_scheduler(resume_from_checkpoint)
        self._load_scaler(resume_from_checkpoint)
        return model, train_dataloader


class _RecordAppliedLearningRates(TrainerCallback):
    """Captures each group's learning rate right after the optimizer step, before the scheduler
    moves it on (when HF reads its own ``learning_rate``)."""

    def __init__(self, trainer: BunnyTrainer):
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._applied_learning_rates = self.trainer.group_learning_rates()

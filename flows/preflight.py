"""Checks before any GPU time, every problem reported at once.

Only what the stages about to run need is checked: a re-run whose training stages are all
complete does not re-open two million images. Checks: model folders exist and their configs
load; each training stage's data file parses and every record passes `bunny.data` validation,
images included (in parallel, with progress); DeepSpeed configs parse; the GPU assignment
fits the visible GPUs (none visible: the CPU path); the output root is writable and has room
for the expected checkpoints and models.
"""

from __future__ import annotations

import importlib.util
import math
import shutil
import tempfile
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from flows.config import EvalSet, MergeAverageConfig, PipelineConfig, TrainingHyperparameters
from flows.gpus import GpuPlanError, plan_placements
from flows.stages import PRETRAIN, merge_stage_name, train_script

Progress = Callable[[str, int, int], None]  # (what, done, total)
BYTES_PER_TRAINED_PARAM = 16  # bf16 weight + fp32 master copy + two fp32 Adam moments, rounded up
BYTES_PER_SAVED_PARAM = 2  # merged and averaged models are saved in 16-bit
MAX_REPORTED = 200


class PreflightError(RuntimeError):
    """Every problem preflight found, one per line."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        listed = "\n".join(f"- {p}" for p in self.problems[:MAX_REPORTED])
        more = f"\n- ... and {len(self.problems) - MAX_REPORTED} more" if len(self.problems) > MAX_REPORTED else ""
        super().__init__(f"preflight found {len(self.problems)} problem(s):\n{listed}{more}")


@dataclass
class PreflightReport:
    passed: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def check(self, name: str, problems: Sequence[str]) -> None:
        if problems:
            self.problems.extend(problems)
        else:
            self.passed.append(name)

    def markdown(self, stages: Collection[str]) -> str:
        lines = ["# Preflight", "", f"Stages to run: {', '.join(stages) if stages else 'none (all complete)'}", ""]
        if self.problems:
            lines += [f"## {len(self.problems)} problem(s)", ""]
            lines += [f"- {p}" for p in self.problems[:MAX_REPORTED]]
            if len(self.problems) > MAX_REPORTED:
                lines.append(f"- ... and {len(self.problems) - MAX_REPORTED} more")
            lines.append("")
        lines += ["## Passed", ""] + [f"- {p}" for p in self.passed]
        return "\n".join(lines) + "\n"


def _config_problems(folder: Path, what: str) -> list[str]:
    if not folder.is_dir():
        return [f"{what} {folder}: no such folder"]
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(str(folder))
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError...
        return [f"{what} {folder}: config does not load ({type(exc).__name__}: {exc})"]
    return []


def _template_problems(llm: Path, templates: Collection[str]) -> list[str]:
    """A chat template whose stop string the LLM's tokenizer cannot emit as one stop token
    would train answers that never end (see `bunny.conversation.check_template_fits`)."""
    from transformers import AutoTokenizer

    from bunny.conversation import check_template_fits
    from bunny.train.train import generation_stop_ids

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(llm))
    except Exception as exc:  # transformers raises OSError, ValueError, ...
        return [f"llm {llm}: tokenizer does not load ({type(exc).__name__}: {exc})"]
    problems = []
    for template in templates:
        try:
            check_template_fits(template, tokenizer, generation_stop_ids(llm))
        except ValueError as exc:
            problems.append(str(exc))
    return problems


def _data_problems(
    data_path: Path, image_folder: Path, template: str, check_images: bool, workers: int,
    progress: Progress | None,
) -> tuple[list[str], dict | None]:
    """The problems of one data set, and the validation record its images earn when they all
    decode (see `bunny.data.validation`), taken before they are decoded."""
    from bunny.data import load_records, validate_records
    from bunny.data.validation import validation_record_content

    problems: list[str] = []
    if not image_folder.is_dir():
        problems.append(f"--image_folder {image_folder}: no such folder")
        check_images = False  # every image would be reported missing; the records still get checked
    try:
        records = load_records(data_path)
    except (OSError, ValueError) as exc:
        return problems + [str(exc)], None
    record = validation_record_content(data_path, image_folder, records) if check_images else None
    report = (lambda done, total: progress(str(data_path), done, total)) if progress else None
    found = validate_records(records, data_path, image_folder, template, check_images, workers, report)
    return problems + [str(p) for p in found], record if not found else None


def _eval_set_problems(eval_set: EvalSet, template: str) -> list[str]:
    """What `bunny.evaluate` would refuse: every training check (images opened) and an answer
    in every record, each problem naming its record."""
    from bunny.evaluate import EvalDataError, load_eval_data

    if not eval_set.image_folder.is_dir():
        return [f"eval set {eval_set.name}: image folder {eval_set.image_folder}: no such folder"]
    try:
        load_eval_data(eval_set.data_path, eval_set.image_folder, template)
    except EvalDataError as exc:
        return [f"eval set {eval_set.name}: {p}" for p in (exc.problems or [str(exc)])]
    return []


def _deepspeed_problems(stage: str, value: str) -> list[str]:
    from bunny.train.ds_config import resolve_deepspeed_config

    try:
        resolve_deepspeed_config(value)
    except (OSError, ValueError) as exc:
        return [f"{stage}: {exc}"]
    return []


def _parameter_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    from bunny.average import AverageError, read_checkpoint

    try:
        return {name: entry.shape for name, entry in read_checkpoint(folder).tensors.items()}
    except AverageError:
        return {}


def expected_output_bytes(config: PipelineConfig, stages: Collection[str]) -> int:
    """A generous estimate of what the pending stages write: checkpoints with optimizer state
    (trainable parameters only) and 16-bit merged and averaged models."""
    llm = _parameter_shapes(config.llm)
    tower = _parameter_shapes(config.vision_tower)
    llm_params = sum(map(math.prod, llm.values()))
    tower_params = sum(map(math.prod, tower.values()))
    hidden = max((s[0] for n, s in llm.items() if n.endswith("norm.weight") and len(s) == 1), default=0)
    vision_hidden = max((s[0] for n, s in tower.items() if n.endswith("norm.weight") and len(s) == 1), default=0)
    projector = vision_hidden * hidden + hidden * hidden + 2 * hidden
    linears = [s for n, s in llm.items() if ".layers." in n and n.endswith(".weight") and len(s) == 2]

    def checkpoints(hp: TrainingHyperparameters, trained: int) -> int:
        kept = hp.save_total_limit + 1 if hp.save_total_limit else 2
        return trained * BYTES_PER_TRAINED_PARAM * kept

    total = 0
    if PRETRAIN in stages:
        total += checkpoints(config.pretrain.hyperparameters, projector)
    for recipe in config.recipes:
        hp = config.recipe_settings(recipe)
        if recipe.name in stages:
            lora = sum((hp.lora_r or 0) * (s[0] + s[1]) for s in linears) if hp.lora_enable else llm_params
            trained = lora + projector + (tower_params if hp.unfreeze_vision_tower else 0)
            total += checkpoints(hp, trained)
        if merge_stage_name(recipe.name) in stages:
            total += (llm_params + tower_params + projector) * BYTES_PER_SAVED_PARAM
    if "average" in stages:
        total += (llm_params + tower_params + projector) * BYTES_PER_SAVED_PARAM
    return total


def _existing_ancestor(path: Path) -> Path:
    """`path` itself if it exists, else the nearest folder above it that does."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _writable_problems(root: Path) -> list[str]:
    """Whether `root` can be written, or created, without creating anything (a failed
    preflight leaves no trace): a temporary file in it, or in the folder it would go under."""
    existing = _existing_ancestor(root)
    if not existing.is_dir():
        return [f"output_root {root}: {existing} is not a folder"]
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".preflight-"):
            pass
    except OSError as exc:
        return [f"output_root {root} is not writable ({exc})"]
    return []


def _output_root_problems(config: PipelineConfig, stages: Collection[str]) -> list[str]:
    root = config.output_root
    problems = _writable_problems(root)
    if problems:
        return problems
    free = shutil.disk_usage(_existing_ancestor(root)).free
    min_free_gb = config.preflight.min_free_gb
    needed = int(min_free_gb * 1e9) if min_free_gb is not None else expected_output_bytes(config, stages)
    if free < needed:
        return [f"output_root {root}: {free / 1e9:.1f} GB free, the stages to run need about {needed / 1e9:.1f} GB"]
    return []


def run_preflight(
    config: PipelineConfig, stages: Collection[str], visible_gpus: Sequence[int],
    progress: Progress | None = None,
) -> PreflightReport:
    """Check everything the `stages` about to run need; never raises for a bad input."""
    report = PreflightReport()
    training = [PRETRAIN] * (PRETRAIN in stages) + [r.name for r in config.recipes if r.name in stages]
    if not stages:
        return report
    if training or any(s.startswith("merge-") for s in stages):
        report.check(f"base LLM config loads ({config.llm})", _config_problems(config.llm, "llm"))
    if training:
        report.check(
            f"vision tower config loads ({config.vision_tower})",
            _config_problems(config.vision_tower, "vision_tower"),
        )
        script = train_script()
        report.check(f"training script {script}", [] if script.is_file() else [f"{script}: no such file"])
        report.check(
            "deepspeed is installed",
            [] if importlib.util.find_spec("deepspeed") else ["deepspeed is not importable"],
        )
    readers: dict[tuple[Path, Path, str], list[str]] = {}  # each data set is checked once, for all its stages
    for stage in training:
        if stage == PRETRAIN:
            data, hp = config.pretrain.data, config.pretrain.hyperparameters
        else:
            recipe = config.recipe(stage)
            data, hp = recipe.data, config.recipe_settings(recipe)
        report.check(f"{stage}: DeepSpeed config {hp.deepspeed} parses", _deepspeed_problems(stage, hp.deepspeed))
        readers.setdefault((data.data_path, data.image_folder, hp.template()), []).append(stage)
    templates = sorted({template for _, _, template in readers})
    if templates and config.llm.is_dir():
        report.check(f"templates {', '.join(templates)} fit the tokenizer of {config.llm}",
                     _template_problems(config.llm, templates))
    what = "records and images" if config.preflight.check_images else "records"
    validation_records: dict[tuple[Path, Path], dict] = {}
    for (data_path, image_folder, template), readers_of in readers.items():
        stages_label = ", ".join(readers_of)
        problems, record = _data_problems(data_path, image_folder, template, config.preflight.check_images,
                                          config.preflight.workers, progress)
        if record is not None:
            validation_records[(data_path, image_folder)] = record
        report.check(f"{stages_label}: {what} of {data_path} ({template} template)",
                     [f"{stages_label}: {problem}" for problem in problems])
    hostfiles = [(PRETRAIN, config.pretrain.launch.hostfile)] + [(r.name, r.launch.hostfile) for r in config.recipes]
    report.check(
        "hostfiles exist",
        [f"{stage}: hostfile {path}: no such file" for stage, path in hostfiles
         if stage in stages and path is not None and not path.is_file()],
    )
    try:
        placements = plan_placements(config, visible_gpus)
        where = "CPU path (no GPU visible)" if not visible_gpus else f"GPUs {list(visible_gpus)}"
        where_each = ", ".join(
            f"{name}: {p.devices or ('cpu' if p.on_cpu else 'hostfile')}" for name, p in placements.items()
        )
        report.check(f"GPU assignment fits: {where}; {where_each}", [])
    except GpuPlanError as exc:
        report.check("GPU assignment", [f"GPU assignment: {exc}"])
    searching = "average" in stages and config.average.weights == "search"
    for eval_set in config.eval_sets:
        if "evaluate" in stages or (searching and eval_set == config.average.validation):
            report.check(f"eval set {eval_set.name}: records and images of {eval_set.data_path}",
                         _eval_set_problems(eval_set, config.evaluate.version))
    report.check(f"output root {config.output_root} writable with room", _output_root_problems(config, stages))
    if not report.problems and validation_records:  # a failed preflight leaves no trace
        from bunny.data.validation import validation_record_path, write_validation_record

        for (data_path, image_folder), record in validation_records.items():
            write_validation_record(validation_record_path(config.output_root, data_path, image_folder), record)
    return report


def run_merge_preflight(config: MergeAverageConfig, stages: Collection[str]) -> PreflightReport:
    """Checks of the merge-and-average deployment: base LLM, LoRA folders, output root."""
    report = PreflightReport()
    if not stages:
        return report
    report.check(f"base LLM config loads ({config.llm})", _config_problems(config.llm, "llm"))
    report.check(
        "LoRA folders hold adapter_config.json",
        [f"input {item.name}: {item.lora_path / 'adapter_config.json'}: no such file"
         for item in config.inputs if not (item.lora_path / "adapter_config.json").is_file()],
    )
    report.check(f"output root {config.output_root} writable", _writable_problems(config.output_root))
    return report

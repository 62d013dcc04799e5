"""Wall time and peak memory of `python -m bunny.merge` on a LoRA run at real layer shapes.

Builds, with random bf16 weights written straight to safetensors (nothing is initialised
through a model), the inputs of one recipe-2 merge:
  - a base LLM with Phi-3-mini's shapes (reference config) but `--layers` decoder layers
    (6 by default: about 2 GB in bf16, the embeddings and lm_head included);
  - a LoRA output folder: adapter r=128 (alpha 256) on every decoder linear, the
    mlp2x_gelu projector and a SigLIP-so400m tower at the reference shapes, trained
    (`unfreeze_vision_tower`, so its weights sit in non_lora_trainables.bin; `--tower-layers`
    cuts its depth, 27 by default = uncut) or, with `--frozen-tower`, loaded from its folder.
Then runs `python -m bunny.merge` in a child process on the same inputs, with PEFT's merge
of a model in memory (the old path, `--merge-method peft`) and with the stream merge (the
default), and reports each one's wall time (the whole command: imports, checks, merge, write,
fsync) and peak RSS (ru_maxrss of the child, read by a small launcher process: the parent's
memory is not counted), both against the output's size, and the ratios old/new. Next to
them: the RSS of a child that only imports torch and transformers (the fixed cost any merge
pays) and the load average before and after (the machine is shared: compare ratios from one
run, not wall times across runs). Temporary files are deleted at the end.

    python benchmarks/merge_bench.py
    python benchmarks/merge_bench.py --layers 4 --tower-layers 8 --frozen-tower
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model
from safetensors.torch import save_file
from transformers import Phi3Config, SiglipVisionConfig, SiglipVisionModel

import bunny  # noqa: F401
from bunny.merge.shards import write_sharded
from bunny.model.families import BunnyPhi3Config, BunnyPhi3ForCausalLM
from bunny.tiny.tokenizer import build_tiny_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE = Path("/work/shared/reference")
PHI3_CONFIG = REFERENCE / "phi-3-mini-4k-instruct.config.json"
SIGLIP_CONFIG = REFERENCE / "siglip-so400m-patch14-384.vision-config.json"
PEFT_PREFIX = "base_model.model."
INPUT_SHARD_BYTES = 10**9
GB = 1e9


def random_bf16(shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """Weights of a plausible scale; uniform is several times faster to draw than normal."""
    return torch.empty(shape, dtype=torch.bfloat16).uniform_(-0.02, 0.02, generator=generator)


def reference_configs(
    layers: int, tower_layers: int, llm_changes: dict | None = None, tower_changes: dict | None = None
) -> tuple[Phi3Config, SiglipVisionConfig, dict]:
    """Phi-3-mini's and SigLIP-so400m's configs at these depths (``*_changes``: other fields
    changed, for a smaller model, e.g. in tests)."""
    phi3 = json.loads(PHI3_CONFIG.read_text())
    phi3 = {k: v for k, v in phi3.items() if k not in ("model_type", "torch_dtype")}
    llm = Phi3Config(**{**phi3, "num_hidden_layers": layers, **(llm_changes or {})}, dtype="bfloat16")
    siglip = json.loads(SIGLIP_CONFIG.read_text())
    processor = siglip.pop("image_processor")
    tower = SiglipVisionConfig(**{**{k: v for k, v in siglip.items() if k != "model_type"}, **(tower_changes or {})})
    tower.num_hidden_layers = tower_layers
    return llm, tower, processor


def bunny_config(llm: Phi3Config, tower: SiglipVisionConfig, tower_path: Path, unfrozen: bool) -> BunnyPhi3Config:
    fields = {k: v for k, v in llm.to_dict().items() if k not in ("model_type", "architectures", "transformers_version")}
    fields["use_cache"] = False  # as train.py saves it
    return BunnyPhi3Config(
        **fields,
        mm_vision_tower=str(tower_path),
        vision_tower_config=tower.to_dict(),
        mm_vision_select_layer=-2,
        mm_hidden_size=tower.hidden_size,
        mm_projector_type="mlp2x_gelu",
        tokenizer_model_max_length=4096,
        image_aspect_ratio="pad",
        unfreeze_vision_tower=unfrozen,
    )


def lora_regex(skeleton: torch.nn.Module) -> str:
    suffixes = sorted({name.split(".", 3)[3] for name, module in skeleton.named_modules()
                       if isinstance(module, torch.nn.Linear) and name.startswith("model.layers.")})
    return r"model\.layers\.\d+\.(?:" + "|".join(s.replace(".", r"\.") for s in suffixes) + ")"


def build_inputs(
    root: Path, layers: int, tower_layers: int, frozen_tower: bool, rank: int,
    llm_changes: dict | None = None, tower_changes: dict | None = None,
) -> dict[str, float]:
    """Write base LLM, tower folder and LoRA output folder under ``root``; return sizes in GB."""
    generator = torch.Generator().manual_seed(0)
    llm_config, tower_config, processor = reference_configs(layers, tower_layers, llm_changes, tower_changes)
    base, tower_dir, run = root / "base", root / "tower", root / "run"
    for folder in (base, tower_dir, run):
        folder.mkdir()
    config = bunny_config(llm_config, tower_config, tower_dir, unfrozen=not frozen_tower)
    with torch.device("meta"):
        skeleton = BunnyPhi3ForCausalLM(copy.deepcopy(config))
    shapes = {name: tensor.shape for name, tensor in skeleton.state_dict().items()}
    sizes = {}

    # Base LLM: a plain Phi-3 checkpoint.
    llm_names = [n for n in shapes if not n.startswith(("model.vision_tower.", "model.mm_projector."))]
    state = {name: random_bf16(shapes[name], generator) for name in llm_names}
    write_sharded(state, base, INPUT_SHARD_BYTES)
    sizes["base_llm_gb"] = sum(t.numel() * 2 for t in state.values()) / GB
    del state
    llm_config.architectures = ["Phi3ForCausalLM"]
    llm_config.save_pretrained(base)
    build_tiny_tokenizer(add_bos=True).save_pretrained(base)

    # Vision tower folder (used for its weights only when frozen) and its image processor.
    with torch.device("meta"):
        tower_names = SiglipVisionModel(tower_config).state_dict()
    tower_state = {name: random_bf16(t.shape, generator) for name, t in tower_names.items()}
    save_file(tower_state, tower_dir / "model.safetensors")
    tower_config.architectures = ["SiglipVisionModel"]
    tower_config.save_pretrained(tower_dir)
    (tower_dir / "preprocessor_config.json").write_text(json.dumps(processor))
    del tower_state

    # LoRA output folder: adapter, non-LoRA trainables, config, processors.
    trained_prefixes = ("model.mm_projector.",) + (() if frozen_tower else ("model.vision_tower.",))
    non_lora = {PEFT_PREFIX + n: random_bf16(s, generator) for n, s in shapes.items() if n.startswith(trained_prefixes)}
    torch.save(non_lora, run / "non_lora_trainables.bin")
    sizes["non_lora_gb"] = sum(t.numel() * 2 for t in non_lora.values()) / GB
    del non_lora
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=lora_regex(skeleton), task_type="CAUSAL_LM")
    inject_adapter_in_model(lora, skeleton, low_cpu_mem_usage=True)
    adapter = {
        PEFT_PREFIX + name.replace(".default", ""): random_bf16(tensor.shape, generator)
        for name, tensor in skeleton.state_dict().items() if "lora_" in name
    }
    save_file(adapter, run / "adapter_model.safetensors")
    sizes["adapter_gb"] = sum(t.numel() * 2 for t in adapter.values()) / GB
    del adapter
    lora.base_model_name_or_path = str(base)
    lora.save_pretrained(run)
    config.dtype = "bfloat16"
    config.save_pretrained(run)
    build_tiny_tokenizer(add_bos=True).save_pretrained(run)
    (run / "preprocessor_config.json").write_text(json.dumps(processor))
    return sizes


# A small launcher between this process and the measured one: a child's ru_maxrss starts from
# the RSS of the process that forked it (Linux carries the old image's high-water mark over
# exec), so forking from this process, which holds the inputs it just built, would inflate it.
LAUNCHER = """
import json, resource, subprocess, sys, time
started = time.perf_counter()
result = subprocess.run(sys.argv[1:], capture_output=True, text=True)
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"wall": time.perf_counter() - started, "code": result.returncode,
                  "maxrss_kb": usage.ru_maxrss, "cpu": usage.ru_utime + usage.ru_stime,
                  "stdout": result.stdout, "stderr": result.stderr[-4000:]}))
"""


def child_peak_rss(command: list[str]) -> tuple[float, float, str, float]:
    """(wall seconds, peak RSS in GB, stdout, CPU seconds) of ``command``, measured by a small
    launcher. CPU seconds (user + system) say more than wall time on a loaded machine."""
    launched = subprocess.run([sys.executable, "-c", LAUNCHER, *command], cwd=REPO_ROOT, capture_output=True, text=True)
    report = json.loads(launched.stdout)
    if report["code"] != 0:
        raise RuntimeError(f"{command[:4]} failed:\n{report['stdout'][-2000:]}\n{report['stderr']}")
    return report["wall"], report["maxrss_kb"] * 1024 / GB, report["stdout"].strip(), report["cpu"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6, help="Phi-3 decoder layers (32 in the real model)")
    parser.add_argument("--tower-layers", type=int, default=27, help="SigLIP layers (27 in the real tower)")
    parser.add_argument("--rank", type=int, default=128, help="LoRA rank (the tutorial's 128)")
    parser.add_argument("--frozen-tower", action="store_true", help="recipe-1: tower loaded from its folder")
    parser.add_argument("--workdir", type=Path, help="where to build the inputs (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--methods", type=lambda text: text.split(","), default=["peft", "stream"],
                        help="merge methods to run, in order (default: peft,stream)")
    args = parser.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="merge-bench-", dir=args.workdir))
    try:
        started = time.perf_counter()
        sizes = build_inputs(root, args.layers, args.tower_layers, args.frozen_tower, args.rank)
        build_seconds = time.perf_counter() - started
        load_before = os.getloadavg()
        import_wall, import_rss, _, import_cpu = child_peak_rss([sys.executable, "-c", "import torch, transformers"])
        output_gb = None
        runs = {}
        for method in args.methods:  # the old path first, then the new one, same inputs
            out = root / f"merged-{method}"
            wall, peak, printed, cpu = child_peak_rss([
                sys.executable, "-m", "bunny.merge", "--model-path", str(root / "run"),
                "--model-base", str(root / "base"), "--model-type", "phi-3", "--save-model-path", str(out),
                "--merge-method", method,
            ])
            index = json.loads((out / "model.safetensors.index.json").read_text())
            output_gb = index["metadata"]["total_size"] / GB
            runs[method] = (wall, peak, printed, cpu)
            shutil.rmtree(out)
        figures = {
            "layers": args.layers,
            "tower_layers": args.tower_layers,
            "tower": "frozen" if args.frozen_tower else "trained (unfrozen)",
            "lora_rank": args.rank,
            **{k: round(v, 3) for k, v in sizes.items()},
            "output_gb": round(output_gb, 3),
            "import_torch_transformers_s": round(import_wall, 1),
            "import_torch_transformers_cpu_s": round(import_cpu, 1),
            "import_torch_transformers_rss_gb": round(import_rss, 3),
            "inputs_build_s": round(build_seconds, 1),
        }
        for method, (wall, peak, _, cpu) in runs.items():
            figures[f"{method}_merge_wall_s"] = round(wall, 1)
            figures[f"{method}_merge_cpu_s"] = round(cpu, 1)
            figures[f"{method}_peak_rss_gb"] = round(peak, 3)
            figures[f"{method}_peak_over_output"] = round(peak / output_gb, 2)
        if {"peft", "stream"} <= set(runs):
            figures["speedup_stream_vs_peft"] = round(runs["peft"][0] / runs["stream"][0], 2)
            figures["cpu_ratio_peft_over_stream"] = round(runs["peft"][3] / runs["stream"][3], 2)
            figures["rss_ratio_stream_vs_peft"] = round(runs["stream"][1] / runs["peft"][1], 2)
        figures["load_average_before"] = " ".join(f"{x:.2f}" for x in load_before)
        figures["load_average_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
        for method, (_, _, printed, _) in runs.items():
            print(printed.splitlines()[-1])
        for key, value in figures.items():
            print(f"{key:>32}: {value}")
        if {"peft", "stream"} <= set(runs):
            print(f"stream vs peft: {figures['speedup_stream_vs_peft']:.2f}x faster in wall time (target >= 3x), "
                  f"{figures['cpu_ratio_peft_over_stream']:.2f}x less CPU; stream's peak RSS "
                  f"{figures['stream_peak_over_output']:.2f}x the output (target <= 1.1x)")
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2) + "\n")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""LoRA merge: the merged model computes what base + adapter + non-LoRA trainables computed.

LoRA output folders are made the way the trainer makes them (``get_peft_model`` with the
trainer's target regex, saved by ``bunny.train.saving.save_lora``) from the tiny assets, with
random adapter, projector and (unfrozen) tower weights so that every part matters. One
integration test merges the output of a real ``deepspeed`` ZeRO-3 run. No folder here has
"lora" in its name: the merge recognises a run by its files.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer

import bunny  # noqa: F401  (Auto-class registration)
from bunny.constants import IMAGE_TOKEN_INDEX
from bunny.fsutil import DirectFile, format_bytes
from bunny.merge import MergeError, main, merge_lora
from bunny.merge.options import MERGE_METHODS
from bunny.model.builder import build_bunny_model
from bunny.train.saving import save_lora
from bunny.train.train import lora_target_regex
from conftest import REPO, fill_the_disk_after, run_deepspeed

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # PEFT on transformers 5
TOLERANCE = 1e-4
NON_LORA = "non_lora_trainables.bin"
PROJECTOR_KEY = "base_model.model.model.mm_projector.0.weight"


@dataclass(frozen=True)
class Run:
    """A LoRA output folder with a checkpoint-2 in it, and the logits of the unmerged models."""

    folder: Path
    tower: Path  # the tower folder the run was built from
    logits: torch.Tensor  # final weights
    checkpoint_logits: torch.Tensor  # checkpoint-2's weights
    no_adapter_logits: torch.Tensor  # final weights, adapter switched off


def sample_inputs(assets) -> dict[str, torch.Tensor]:
    """Two rows, right-padded: one with an image, one text-only."""
    tokenizer = AutoTokenizer.from_pretrained(assets.llm)
    processor = AutoImageProcessor.from_pretrained(assets.vision_tower)
    image = Image.open(sorted(assets.finetune_images.rglob("*.png"))[0]).convert("RGB")
    first = tokenizer("USER: what is shown? ASSISTANT: a shape").input_ids
    second = tokenizer("USER: how many letters in cat? ASSISTANT:").input_ids
    first = first[:1] + [IMAGE_TOKEN_INDEX] + first[1:]
    width = max(len(first), len(second))
    pad = tokenizer.pad_token_id
    return {
        "input_ids": torch.tensor([row + [pad] * (width - len(row)) for row in (first, second)]),
        "attention_mask": torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in (first, second)]),
        "images": processor(images=image, return_tensors="pt").pixel_values,
    }


@torch.no_grad()
def logits_of(model, inputs) -> torch.Tensor:
    return model.eval()(**inputs).logits


def perturb_trainables(model, scale: float) -> None:
    """Stand-in for training: move every trainable tensor (LoRA B starts at zero)."""
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * scale)


def make_run(assets, root: Path, unfrozen: bool, seed: int) -> Run:
    """What ``train.py --lora_enable True`` writes, made in-process in a second."""
    torch.manual_seed(seed)
    tower = root / "tower"
    shutil.copytree(assets.vision_tower, tower)
    model = build_bunny_model(assets.llm, "phi-3", tower, "mlp2x_gelu", dtype=torch.float32)
    model.config.use_cache = False
    model.config.image_aspect_ratio = "pad"
    model.config.tokenizer_model_max_length = 256
    model.config.unfreeze_vision_tower = unfrozen
    model.requires_grad_(False)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=lora_target_regex(model), task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    peft_model.get_base_model().get_model().mm_projector.requires_grad_(True)
    peft_model.get_base_model().get_model().vision_tower.requires_grad_(unfrozen)
    processors = (AutoTokenizer.from_pretrained(assets.llm), AutoImageProcessor.from_pretrained(tower))
    inputs = sample_inputs(assets)
    folder = root / "run"

    perturb_trainables(peft_model, 0.05)
    checkpoint = folder / "checkpoint-2"
    save_lora(peft_model, checkpoint, True, processors)
    (checkpoint / "global_step2").mkdir()  # DeepSpeed state: ignored by the merge
    (checkpoint / "global_step2" / "mp_rank_00_model_states.pt").write_bytes(b"not a model")
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    checkpoint_logits = logits_of(peft_model, inputs)

    perturb_trainables(peft_model, 0.05)
    save_lora(peft_model, folder, True, processors)
    logits = logits_of(peft_model, inputs)
    with peft_model.disable_adapter():
        no_adapter_logits = logits_of(peft_model, inputs)
    return Run(folder, tower, logits, checkpoint_logits, no_adapter_logits)


@pytest.fixture(scope="module")
def frozen_run(tiny_assets, tmp_path_factory) -> Run:
    return make_run(tiny_assets, tmp_path_factory.mktemp("frozen"), unfrozen=False, seed=1)


@pytest.fixture(scope="module")
def unfrozen_run(tiny_assets, tmp_path_factory) -> Run:
    return make_run(tiny_assets, tmp_path_factory.mktemp("unfrozen"), unfrozen=True, seed=2)


@pytest.fixture
def inputs(tiny_assets):
    return sample_inputs(tiny_assets)


def load_merged(folder: Path, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def copy_run(run: Run, destination: Path) -> Path:
    shutil.copytree(run.folder, destination, ignore=shutil.ignore_patterns("checkpoint-*"))
    return destination


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# --- equivalence ----------------------------------------------------------------------
@pytest.mark.parametrize("which", ["frozen", "unfrozen"])
def test_merged_model_computes_what_the_unmerged_one_did(request, which, tiny_assets, inputs, tmp_path):
    run: Run = request.getfixturevalue(f"{which}_run")
    out = tmp_path / "merged"
    result = merge_lora(run.folder, tiny_assets.llm, out, "phi-3")
    assert result.tower_trained is (which == "unfrozen")
    assert result.dtype == torch.float32  # what the run trained in

    # Complete and self-contained: shards + index, config with the tower's config, processors.
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == result.shard_files == ["model-00001-of-00001.safetensors"]
    keys = set(index["weight_map"])
    assert not any("lora_" in key or "base_layer" in key for key in keys)
    assert {"model.mm_projector.0.weight", "lm_head.weight"} <= keys
    assert any(key.startswith("model.vision_tower.vision_tower.") for key in keys)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "bunny-phi3" and config["vision_tower_config"]["model_type"] == "siglip_vision_model"
    assert config["use_cache"] is True and config["dtype"] == "float32"
    assert config["unfreeze_vision_tower"] is (which == "unfrozen") and config["image_aspect_ratio"] == "pad"
    assert AutoTokenizer.from_pretrained(out).pad_token_id == AutoTokenizer.from_pretrained(tiny_assets.llm).pad_token_id
    assert AutoImageProcessor.from_pretrained(out).size == {"height": 32, "width": 32}

    moved = run.tower.with_name("tower-moved")  # the merged model needs no tower folder
    run.tower.rename(moved)
    try:
        merged = load_merged(out)
    finally:
        moved.rename(run.tower)
    logits = logits_of(merged, inputs)
    assert max_diff(logits, run.logits) <= TOLERANCE
    assert max_diff(logits, run.no_adapter_logits) > 100 * TOLERANCE  # the adapter was merged, and matters


def test_a_checkpoint_folder_merges_through_the_cli(frozen_run, tiny_assets, inputs, tmp_path, capsys):
    out = tmp_path / "from-checkpoint"
    code = main([
        "--model-path", str(frozen_run.folder / "checkpoint-2"),
        "--model-base", str(tiny_assets.llm),
        "--model-type", "phi-3",
        "--save-model-path", str(out),
    ])
    assert code == 0 and f"wrote {out}" in capsys.readouterr().out
    assert not (out / "global_step2").exists() and not (out / "trainer_state.json").exists()
    logits = logits_of(load_merged(out), inputs)
    assert max_diff(logits, frozen_run.checkpoint_logits) <= TOLERANCE
    assert max_diff(logits, frozen_run.logits) > 100 * TOLERANCE


def test_dtype_and_shard_size(unfrozen_run, tiny_assets, inputs, tmp_path):
    out = tmp_path / "bf16"
    result = merge_lora(unfrozen_run.folder, tiny_assets.llm, out, dtype="bfloat16", max_shard_size="100KB")
    assert len(result.shard_files) > 1 and result.shard_files[-1].endswith(f"of-{len(result.shard_files):05d}.safetensors")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    dtypes = set()
    for shard in result.shard_files:
        with safe_open(out / shard, "pt") as handle:
            assert set(handle.keys()) == {k for k, v in index["weight_map"].items() if v == shard}
            dtypes |= {handle.get_slice(key).get_dtype() for key in handle.keys()}
    assert dtypes == {"BF16"} and index["metadata"]["total_size"] == result.total_size
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    merged = load_merged(out, dtype=torch.bfloat16)
    assert merged.dtype == torch.bfloat16
    # bf16 keeps 8 significant bits: one rounding moves a value by at most half an ulp,
    # 2^-8 of it. The bf16 forward rounds the stored weights, then the outputs of each block
    # (tower, projector, 2 decoder layers, lm_head): the logits carry a few such errors at
    # their own scale. Allow 4 roundings of the largest logit (~0.66 here: 0.0103; measured
    # 0.006); an unmerged adapter moves them by more (see the float32 tests: > 0.01).
    expected = unfrozen_run.logits
    bound = 4 * 2**-8 * expected.abs().max().item()
    assert max_diff(logits_of(merged, inputs), expected) < bound


def test_no_model_is_built_and_each_input_tensor_is_read_once(frozen_run, tiny_assets, tmp_path, monkeypatch):
    """The stream builds no model (not even the base LLM's) and reads every base and tower
    tensor it writes exactly once; PEFT's path loads the base once and copies no module."""
    from bunny.merge.stream import TensorReader
    from bunny.model.families import BunnyPhi3ForCausalLM

    loads, copies, reads = [], [], []
    real_from_pretrained = BunnyPhi3ForCausalLM.from_pretrained.__func__
    monkeypatch.setattr(BunnyPhi3ForCausalLM, "from_pretrained",
                        classmethod(lambda cls, *a, **k: loads.append(a[0]) or real_from_pretrained(cls, *a, **k)))
    monkeypatch.setattr(torch.nn.Module, "__deepcopy__", lambda self, memo: copies.append(self), raising=False)
    real_read = TensorReader.read
    monkeypatch.setattr(TensorReader, "read", lambda self, entry: reads.append(entry.name) or real_read(self, entry))
    merge_lora(frozen_run.folder, tiny_assets.llm, tmp_path / "out")
    assert loads == [] and copies == []
    base = set(load_file(tiny_assets.llm / "model.safetensors"))
    tower = set(load_file(frozen_run.tower / "model.safetensors"))
    assert sorted(reads) == sorted(base | tower)  # each once (the projector comes from the run)
    merge_lora(frozen_run.folder, tiny_assets.llm, tmp_path / "peft", merge_method="peft")
    assert loads == [str(tiny_assets.llm)] and copies == []


def _status_bytes(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE).group(1)) * 1024


def peak_rss_growth(action) -> int:
    """How far this process's peak RSS rises above its RSS before ``action`` (Linux resets
    the peak when asked: ``/proc/self/clear_refs``)."""
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_bytes("VmRSS")
    action()
    return _status_bytes("VmHWM") - before


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs")
def test_the_stream_holds_a_fraction_of_the_output_in_memory(tmp_path):
    """A 316 MB merge (benchmarks/merge_bench.py's inputs, narrower): the peak RSS grows by
    well under the output's size. The stream holds a tensor per worker (one per thread, at
    most 8: pinned to 2 here) plus one being written and the writer's 64 MB of buffers, so its
    peak does not grow with the layers (PEFT's path, which holds the model, grew 1.22x). At 4
    layers (182 MB) a first merge in a fresh process reached 0.77x: the allocator's slack is a
    fixed cost."""
    spec = importlib.util.spec_from_file_location("merge_bench", REPO / "benchmarks" / "merge_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.build_inputs(
        tmp_path, layers=8, tower_layers=2, frozen_tower=False, rank=16,
        llm_changes={"hidden_size": 1024, "intermediate_size": 4096, "vocab_size": 8192, "pad_token_id": 0, "eos_token_id": 2,
                     "num_attention_heads": 16, "num_key_value_heads": 16},
        tower_changes={"hidden_size": 384, "intermediate_size": 1536, "num_attention_heads": 6},
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # two merge workers, each holding a tensor, whatever the host's cores
    try:
        merge_lora(tmp_path / "run", tmp_path / "base", tmp_path / "warm-up")  # first-use imports and caches
        shutil.rmtree(tmp_path / "warm-up")
        out = tmp_path / "merged"
        growth = peak_rss_growth(lambda: merge_lora(tmp_path / "run", tmp_path / "base", out))
    finally:
        torch.set_num_threads(threads)
    print(f"peak RSS grew {growth / 1e6:.0f} MB")  # a figure, the check is below
    output_bytes = json.loads((out / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    assert output_bytes > 300e6
    assert growth < 0.75 * output_bytes, f"peak RSS grew {growth / 1e6:.0f} MB for a {output_bytes / 1e6:.0f} MB output"


# --- output safety --------------------------------------------------------------------
def test_existing_output_is_refused_unless_overwrite(frozen_run, tiny_assets, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(MergeError, match=f"--save-model-path {out} already exists"):
        merge_lora(frozen_run.folder, tiny_assets.llm, out)
    assert (out / "keep.txt").read_text() == "mine"
    merge_lora(frozen_run.folder, tiny_assets.llm, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors.index.json").is_file()
    with pytest.raises(MergeError, match="overlaps input folder"):
        merge_lora(frozen_run.folder, tiny_assets.llm, frozen_run.folder / "merged")


def test_a_crash_while_writing_leaves_nothing_that_looks_finished(frozen_run, tiny_assets, tmp_path, monkeypatch):
    import bunny.merge.shards as shards

    written = []

    def write_then_crash(path, specs, tensor_of, **options):
        if written:
            raise OSError("disk full")
        written.append(path)
        real_write(path, specs, tensor_of, **options)

    real_write = shards.write_safetensors
    monkeypatch.setattr(shards, "write_safetensors", write_then_crash)
    out = tmp_path / "merged"
    with pytest.raises(OSError, match="disk full"):
        merge_lora(frozen_run.folder, tiny_assets.llm, out, max_shard_size="100KB")
    assert written and not out.exists()
    assert list(tmp_path.iterdir()) == []  # the temporary folder is gone too


# --- bad inputs -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "removed, message",
    [
        ("adapter_config.json", "missing adapter config {folder}/adapter_config.json"),
        ("adapter_model.safetensors", "missing adapter weights {folder}/adapter_model.safetensors"),
        (NON_LORA, "missing non-LoRA trainables .* {folder}/non_lora_trainables.bin"),
        ("config.json", "missing Bunny model config {folder}/config.json"),
    ],
)
def test_missing_run_files_are_named(frozen_run, tiny_assets, tmp_path, removed, message):
    folder = copy_run(frozen_run, tmp_path / "run")
    (folder / removed).unlink()
    with pytest.raises(MergeError, match=message.format(folder=folder)):
        merge_lora(folder, tiny_assets.llm, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_folders_that_are_not_lora_runs(frozen_run, tiny_assets, tmp_path):
    with pytest.raises(MergeError, match=f"--model-path {tmp_path / 'nowhere'}: folder not found"):
        merge_lora(tmp_path / "nowhere", tiny_assets.llm, tmp_path / "out")
    pretrain = tmp_path / "pretrain"
    pretrain.mkdir()
    (pretrain / "config.json").write_text("{}")
    torch.save({"model.mm_projector.0.weight": torch.zeros(1)}, pretrain / "mm_projector.bin")
    with pytest.raises(MergeError, match=f"--model-path {pretrain} is a pretrain output"):
        merge_lora(pretrain, tiny_assets.llm, tmp_path / "out")
    with pytest.raises(MergeError, match=f"--model-path {tiny_assets.llm} holds full model weights"):
        merge_lora(tiny_assets.llm, tiny_assets.llm, tmp_path / "out")
    crashed = tmp_path / "crashed"  # a run that saved checkpoints but never its final folder
    shutil.copytree(frozen_run.folder / "checkpoint-2", crashed / "checkpoint-2")
    with pytest.raises(MergeError, match=f"{crashed} is not a LoRA output folder.*checkpoint-2 are: pass one"):
        merge_lora(crashed, tiny_assets.llm, tmp_path / "out")


def test_base_model_problems_are_named(frozen_run, tiny_assets, tmp_path):
    with pytest.raises(MergeError, match=f"--model-base {tmp_path / 'gone'}: folder not found"):
        merge_lora(frozen_run.folder, tmp_path / "gone", tmp_path / "out")
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(MergeError, match=f"--model-base {llama} is a 'llama' model, but --model-type phi-3 expects 'phi3'"):
        merge_lora(frozen_run.folder, llama, tmp_path / "out", "phi-3")
    with pytest.raises(MergeError, match=f"--model-type llama does not match --model-path {frozen_run.folder}.*'bunny-phi3'"):
        merge_lora(frozen_run.folder, llama, tmp_path / "out", "llama")
    wider = tmp_path / "wider"
    shutil.copytree(tiny_assets.llm, wider)
    edit_json(wider / "config.json", hidden_size=128)
    with pytest.raises(MergeError, match=f"--model-base {wider} is not the LLM .* hidden_size 128 vs 64"):
        merge_lora(frozen_run.folder, wider, tmp_path / "out")


def test_a_moved_frozen_tower_needs_vision_tower(frozen_run, tiny_assets, inputs, tmp_path):
    folder = copy_run(frozen_run, tmp_path / "run")
    gone = tmp_path / "where-the-tower-was"
    edit_json(folder / "config.json", mm_vision_tower=str(gone))
    with pytest.raises(MergeError, match=f"tower weights unavailable.*{gone} .*pass --vision-tower"):
        merge_lora(folder, tiny_assets.llm, tmp_path / "out")
    with pytest.raises(MergeError, match=f"--vision-tower {tmp_path / 'typo'}: folder not found"):
        merge_lora(folder, tiny_assets.llm, tmp_path / "out", vision_tower=tmp_path / "typo")
    with pytest.raises(MergeError, match=f"--vision-tower {tiny_assets.llm}: model_type 'phi3' is not a supported tower"):
        merge_lora(folder, tiny_assets.llm, tmp_path / "out", vision_tower=tiny_assets.llm)
    merge_lora(folder, tiny_assets.llm, tmp_path / "out", vision_tower=frozen_run.tower)
    assert max_diff(logits_of(load_merged(tmp_path / "out"), inputs), frozen_run.logits) <= TOLERANCE
    assert json.loads((tmp_path / "out" / "config.json").read_text())["mm_vision_tower"] == str(frozen_run.tower)

    partial = tmp_path / "partial-tower"
    shutil.copytree(frozen_run.tower, partial)
    weights = load_file(partial / "model.safetensors")
    del weights["embeddings.patch_embedding.weight"]
    save_file(weights, partial / "model.safetensors")
    with pytest.raises(MergeError, match=f"vision tower {partial} lacks weights of the tower: embeddings.patch_embedding.weight"):
        merge_lora(folder, tiny_assets.llm, tmp_path / "out2", vision_tower=partial)
    assert not (tmp_path / "out2").exists()


def test_adapter_keys_that_do_not_fit_are_named(frozen_run, tiny_assets, tmp_path):
    folder = copy_run(frozen_run, tmp_path / "run")
    adapter = load_file(folder / "adapter_model.safetensors")
    key = sorted(adapter)[0]
    renamed = key.replace("layers.0.", "layers.7.")
    adapter[renamed] = adapter.pop(key)
    save_file(adapter, folder / "adapter_model.safetensors")
    for method in MERGE_METHODS:  # the stream checks without PEFT, the fallback with it: the same message
        with pytest.raises(MergeError, match=rf"adapter_model.safetensors does not fit.*{renamed}.*missing keys: {key}"):
            merge_lora(folder, tiny_assets.llm, tmp_path / "out", merge_method=method)
    adapter[key] = adapter.pop(renamed)[:4]  # a smaller rank than the adapter config's
    save_file(adapter, folder / "adapter_model.safetensors")
    for method in MERGE_METHODS:
        with pytest.raises(MergeError, match=rf"shapes that do not fit \(r=8\): {key}: file \(4, "):
            merge_lora(folder, tiny_assets.llm, tmp_path / "out", merge_method=method)
    edit_json(folder / "adapter_config.json", target_modules=r"model\.nothing\.here")
    with pytest.raises(MergeError, match=r"adapter_config.json: target_modules .*nothing.*here' do not fit"):
        merge_lora(folder, tiny_assets.llm, tmp_path / "out")


def test_non_lora_keys_that_do_not_fit_are_named(frozen_run, tiny_assets, tmp_path):
    folder = copy_run(frozen_run, tmp_path / "run")
    original = torch.load(folder / NON_LORA, weights_only=True)

    torch.save({**original, "base_model.model.model.mm_projector.9.weight": torch.zeros(2)}, folder / NON_LORA)
    with pytest.raises(MergeError, match=r"non_lora_trainables.bin does not fit.*not weights of the model: base_model.model.model.mm_projector.9.weight"):
        merge_lora(folder, tiny_assets.llm, tmp_path / "out")
    torch.save({k: v for k, v in original.items() if k != PROJECTOR_KEY}, folder / NON_LORA)
    with pytest.raises(MergeError, match=f"missing keys: {PROJECTOR_KEY}"):
        merge_lora(folder, tiny_assets.llm, tmp_path / "out")
    torch.save({**original, PROJECTOR_KEY: torch.zeros(3, 3)}, folder / NON_LORA)
    with pytest.raises(MergeError, match=rf"shapes that do not fit: model.mm_projector.0.weight: file \(3, 3\)"):
        merge_lora(folder, tiny_assets.llm, tmp_path / "out")
    torch.save(original, folder / NON_LORA)
    edit_json(folder / "config.json", unfreeze_vision_tower=True)  # the trained tower would be lost
    with pytest.raises(MergeError, match=f"{folder / NON_LORA} holds no vision tower weights"):
        merge_lora(folder, tiny_assets.llm, tmp_path / "out")


def test_corrupt_or_empty_run_files_are_named(frozen_run, tiny_assets, tmp_path):
    folder = copy_run(frozen_run, tmp_path / "run")
    (folder / NON_LORA).write_bytes(b"")
    with pytest.raises(MergeError, match=f"{folder / NON_LORA} is empty \\(0 bytes\\)"):
        merge_lora(folder, tiny_assets.llm, tmp_path / "out")
    good = (frozen_run.folder / NON_LORA).read_bytes()
    (folder / NON_LORA).write_bytes(good[: len(good) // 2])  # a save cut short
    with pytest.raises(MergeError, match=f"{folder / NON_LORA} is corrupt or not a PyTorch file \\({len(good) // 2} bytes") as caught:
        merge_lora(folder, tiny_assets.llm, tmp_path / "out")
    assert "old format" not in str(caught.value)
    (folder / NON_LORA).write_bytes(good)
    (folder / "adapter_model.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(MergeError, match="adapter_model.safetensors is corrupt or not a safetensors file"):
        merge_lora(folder, tiny_assets.llm, tmp_path / "out")
    with pytest.raises(MergeError, match=f"--model-path {folder / NON_LORA} is a file, not a folder"):
        merge_lora(folder / NON_LORA, tiny_assets.llm, tmp_path / "out")
    with pytest.raises(MergeError, match=f"--model-base {tiny_assets.llm / 'config.json'} is a file, not a folder"):
        merge_lora(frozen_run.folder, tiny_assets.llm / "config.json", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_nan_or_inf_in_an_input_is_refused_by_name(frozen_run, tiny_assets, tmp_path):
    folder = copy_run(frozen_run, tmp_path / "run")
    state = torch.load(folder / NON_LORA, weights_only=True)
    state[PROJECTOR_KEY] = state[PROJECTOR_KEY].clone()
    state[PROJECTOR_KEY][0, 0] = float("nan")
    torch.save(state, folder / NON_LORA)
    with pytest.raises(MergeError, match=f"{folder / NON_LORA} holds NaN or inf values in {PROJECTOR_KEY}"):
        merge_lora(folder, tiny_assets.llm, tmp_path / "out")
    shutil.copy(frozen_run.folder / NON_LORA, folder / NON_LORA)
    adapter = load_file(folder / "adapter_model.safetensors")
    key = sorted(adapter)[-1]
    adapter[key] = adapter[key].clone()
    adapter[key].view(-1)[3] = float("inf")
    save_file(adapter, folder / "adapter_model.safetensors")
    with pytest.raises(MergeError, match=f"adapter_model.safetensors holds NaN or inf values in {key}"):
        merge_lora(folder, tiny_assets.llm, tmp_path / "out")
    base = tmp_path / "base"
    shutil.copytree(tiny_assets.llm, base)
    weights = load_file(base / "model.safetensors")
    weights["model.norm.weight"][0] = float("inf")
    save_file(weights, base / "model.safetensors")
    with pytest.raises(MergeError, match=f"--model-base {base} holds NaN or inf values in model.norm.weight"):
        merge_lora(frozen_run.folder, base, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # Finite inputs whose cast to the output dtype overflows: a run's tensor (screened when
    # loaded, so screened again only when its values change) and a base tensor.
    state = torch.load(frozen_run.folder / NON_LORA, weights_only=True)
    state[PROJECTOR_KEY] = state[PROJECTOR_KEY].clone()
    state[PROJECTOR_KEY][0, 0] = 1e6  # beyond float16's 65504
    torch.save(state, folder / NON_LORA)
    shutil.copy(frozen_run.folder / "adapter_model.safetensors", folder / "adapter_model.safetensors")
    projector = PROJECTOR_KEY.removeprefix("base_model.model.")
    with pytest.raises(MergeError, match=f"merging {projector} gives values beyond torch.float16's range"):
        merge_lora(folder, tiny_assets.llm, tmp_path / "out", dtype="float16")
    weights["model.norm.weight"][0] = 1e6
    save_file(weights, base / "model.safetensors")
    with pytest.raises(MergeError, match="merging model.norm.weight gives values beyond torch.float16's range"):
        merge_lora(frozen_run.folder, base, tmp_path / "out", dtype="float16")
    assert not (tmp_path / "out").exists()


def test_free_space_is_checked_before_loading_and_counts_everything_written(frozen_run, tiny_assets, tmp_path, monkeypatch):
    import bunny.merge.space as space

    checked = []
    real_check = space.check_free_space
    monkeypatch.setattr("bunny.merge.merger.check_free_space", lambda *a: checked.append(a[1]) or real_check(*a))
    out = tmp_path / "merged"
    merge_lora(frozen_run.folder, tiny_assets.llm, out)
    written = sum(path.stat().st_size for path in out.rglob("*") if path.is_file())
    needed = checked[0]
    assert written <= needed <= written + 256 * 1024  # everything counted, with a small allowance

    monkeypatch.setattr(space, "free_bytes", lambda path: 200_000)
    loads = []
    monkeypatch.setattr("bunny.merge.stream.TensorReader.read", lambda *a: loads.append(a))
    with pytest.raises(MergeError, match=rf"--save-model-path {tmp_path / 'small'} needs {format_bytes(needed)} "
                                         rf"\(weights .* KB, .*\) but {tmp_path} has 200.0 KB free"):
        merge_lora(frozen_run.folder, tiny_assets.llm, tmp_path / "small")
    assert loads == [] and not (tmp_path / "small").exists()


@pytest.mark.parametrize("refuse_direct", [False, True], ids=["O_DIRECT", "file system without it"])
def test_direct_file_writes_exactly_the_bytes_given(tmp_path, monkeypatch, refuse_direct):
    """Pieces of every size, across buffer boundaries, a tail that is not a whole block:
    the file holds the bytes given, no padding. A file system that refuses O_DIRECT writes
    (EINVAL) gets the same bytes through the page cache."""
    if refuse_direct:
        real_pwrite = os.pwrite

        def no_direct(fd, data, offset):
            if DirectFile.direct_flag(fd):
                raise OSError(errno.EINVAL, "Invalid argument")
            return real_pwrite(fd, data, offset)

        monkeypatch.setattr(os, "pwrite", no_direct)
    data = torch.randint(0, 256, (3 * 8192 + 4321,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    output = DirectFile(tmp_path / "out.bin", buffer_bytes=8192, buffers=2)
    pieces = [0, 1, 4095, 4096, 8191, 8192, 10_000]
    start = 0
    while start < data.numel():
        size = pieces[start % len(pieces)] or 1
        output.write(data[start:start + size].numpy())
        start += size
    output.close()
    assert (tmp_path / "out.bin").read_bytes() == data.numpy().tobytes()
    assert output.size == data.numel() and output.direct is not refuse_direct


def test_direct_file_raises_the_disk_s_first_error(tmp_path, monkeypatch):
    fill_the_disk_after(monkeypatch, room=8192)
    output = DirectFile(tmp_path / "out.bin", buffer_bytes=8192, buffers=2)
    with pytest.raises(OSError, match=r"\(write\)"):
        for _ in range(8):  # the writer thread fails on the second buffer; a later write or close says so
            output.write(bytes(8192))
        output.close()
    output.abort()  # never raises


def test_sizes_read_in_human_units():
    assert [format_bytes(n) for n in (0, 812, 18_600, 512_000_000, 7_642_000_000, 150_300_000_000)] == [
        "0 B", "812 B", "18.6 KB", "512.0 MB", "7.64 GB", "150.30 GB"]


def test_a_full_disk_mid_write_is_one_clear_error(frozen_run, tiny_assets, tmp_path, monkeypatch):
    fill_the_disk_after(monkeypatch, room=50_000)
    out = tmp_path / "merged"
    with pytest.raises(MergeError, match=rf"disk full while writing --save-model-path {out}: it needs .* KB \(weights") as caught:
        merge_lora(frozen_run.folder, tiny_assets.llm, out)
    assert "was free when the merge started" in str(caught.value) and "partial output was removed" in str(caught.value)
    assert "(write)" in str(caught.value.__cause__)  # the write's error, not the clean-up's
    assert list(tmp_path.iterdir()) == []  # no output, no temporary folder


def test_cli_user_errors_are_one_line_and_debug_shows_the_traceback(tiny_assets, tmp_path, capsys):
    argv = ["--model-path", str(tmp_path / "missing"), "--model-base", str(tiny_assets.llm),
            "--save-model-path", str(tmp_path / "out")]
    assert main(argv) == 2
    assert capsys.readouterr().err == f"bunny-merge: error: --model-path {tmp_path / 'missing'}: folder not found\n"
    with pytest.raises(MergeError, match="folder not found"):
        main([*argv, "--debug"])


def test_python_dash_m_reports_bad_input_and_exits_2(tiny_assets, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "bunny.merge", "--model-path", str(tmp_path / "missing"),
         "--model-base", str(tiny_assets.llm), "--model-type", "phi-3", "--save-model-path", str(tmp_path / "out")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert f"bunny-merge: error: --model-path {tmp_path / 'missing'}: folder not found" in result.stderr


# --- a real training run --------------------------------------------------------------
@pytest.fixture(scope="module")
def deepspeed_run(tiny_assets, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("deepspeed")
    flags = {
        "lora_enable": True, "lora_r": 8, "lora_alpha": 16, "deepspeed": "zero3",
        "model_name_or_path": tiny_assets.llm, "model_type": "phi-3", "version": "phi3",
        "data_path": tiny_assets.recipe2_data, "image_folder": tiny_assets.finetune_images,
        "vision_tower": tiny_assets.vision_tower, "unfreeze_vision_tower": True,
        "mm_projector_type": "mlp2x_gelu", "image_aspect_ratio": "pad", "output_dir": work / "out",
        "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "learning_rate": 1e-2,
        "lr_scheduler_type": "constant", "save_strategy": "steps", "save_steps": 2, "max_steps": 4,
        "model_max_length": 256, "dataloader_num_workers": 0, "report_to": "none", "seed": 0,
    }
    result = run_deepspeed([item for k, v in flags.items() for item in (f"--{k}", str(v))], cwd=work)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return work / "out"


def unmerged_from_disk(folder: Path, assets):
    """The run as LLaVA-style code evaluates it: base + tower, adapter on top, then the
    non-LoRA trainables loaded over it."""
    model = build_bunny_model(assets.llm, "phi-3", assets.vision_tower, "mlp2x_gelu", dtype=torch.float32)
    model = PeftModel.from_pretrained(model, folder)
    result = model.load_state_dict(torch.load(folder / NON_LORA, weights_only=True), strict=False)
    assert not result.unexpected_keys
    return model


@pytest.mark.slow
@pytest.mark.parametrize("subfolder", [".", "checkpoint-2"])
def test_merging_a_deepspeed_zero3_run_with_an_unfrozen_tower(deepspeed_run, subfolder, tiny_assets, inputs, tmp_path):
    folder = (deepspeed_run / subfolder).resolve()
    trained = torch.load(folder / NON_LORA, weights_only=True)
    assert any(".vision_tower." in key for key in trained)
    out = tmp_path / "merged"
    result = merge_lora(folder, tiny_assets.llm, out, "phi-3")
    assert result.tower_trained
    expected = logits_of(unmerged_from_disk(folder, tiny_assets), inputs)
    merged = load_merged(out)
    assert max_diff(logits_of(merged, inputs), expected) <= TOLERANCE
    merged_state = merged.state_dict()  # the trained tower, not the original one
    tower_keys = [key for key in trained if ".vision_tower." in key]
    assert all(torch.equal(merged_state[key.removeprefix("base_model.model.")], trained[key]) for key in tower_keys)


def test_the_stream_merge_is_peft_s_merge_or_closer(unfrozen_run, tiny_assets, tmp_path):
    """float32: the same weights as PEFT's merge. bf16: both see the base weight W in bf16
    (the model PEFT merges is loaded in bf16); the stream adds the delta in float32 and rounds
    the sum once, so its weights are exactly the float32 merge of that bf16 base, rounded:
    the closest bf16 values there are. PEFT rounds the delta to bf16 first, then the sum: it
    is never closer, and measurably further off."""
    def merged(dtype, method, base=tiny_assets.llm):
        out = tmp_path / f"{dtype}-{method}-{base.name}"
        result = merge_lora(unfrozen_run.folder, base, out, dtype=dtype, merge_method=method)
        assert result.method == method
        return load_file(out / "model-00001-of-00001.safetensors")

    exact, peft32 = merged("float32", "stream"), merged("float32", "peft")
    base = load_file(tiny_assets.llm / "model.safetensors")
    lora_targets = [k for k in exact if k.startswith("model.layers.") and k.endswith("proj.weight")]
    assert lora_targets and all(not torch.equal(exact[k], base[k]) for k in lora_targets)  # LoRA was applied
    assert set(exact) == set(peft32)
    for key in exact:
        torch.testing.assert_close(exact[key], peft32[key], rtol=1e-6, atol=1e-7)

    rounded_base = tmp_path / "base-in-bf16"  # the base's values as a bf16 model holds them, stored in float32
    shutil.copytree(tiny_assets.llm, rounded_base)
    save_file({k: v.to(torch.bfloat16).float() for k, v in base.items()}, rounded_base / "model.safetensors")
    reference = merged("float32", "stream", rounded_base)  # bf16 W + delta, in float32: no rounding of the sum
    stream16, peft16 = merged("bfloat16", "stream"), merged("bfloat16", "peft")
    assert all(torch.equal(stream16[key], reference[key].to(torch.bfloat16)) for key in reference)  # one rounding
    stream_error = {key: (stream16[key].float() - reference[key]).abs() for key in lora_targets}
    peft_error = {key: (peft16[key].float() - reference[key]).abs() for key in lora_targets}
    assert all(bool((stream_error[key] <= peft_error[key]).all()) for key in lora_targets)
    assert sum(e.sum() for e in stream_error.values()) < sum(e.sum() for e in peft_error.values())  # PEFT's extra rounding shows
    with pytest.raises(ValueError, match="merge method 'fast'"):
        merge_lora(unfrozen_run.folder, tiny_assets.llm, tmp_path / "x", merge_method="fast")

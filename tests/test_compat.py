"""Two-way compatibility with the original BAAI-DCAI/Bunny code's files.

``../shared/fixtures/upstream-bunny-tiny`` holds what the original code wrote (transformers
4.41, on tiny models): a pretrain ``mm_projector.bin``, two LoRA runs (one with the tower
unfrozen), its merge script's outputs, and reference logits its own loader computed.

- Reading theirs: every file loads here and reproduces the reference logits.
- Writing ours: this project's ``non_lora_trainables.bin``, merged and averaged models are
  re-read as the original reads them: its key renaming, its strict tower load against a full
  SigLIP state dict, the config fields its builder uses.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from torch import nn
from transformers import AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer, SiglipVisionConfig, SiglipVisionModel

import bunny  # noqa: F401  (Auto-class registration)
from bunny.average import average_checkpoints
from bunny.merge import main as merge_main, merge_lora
from bunny.model.builder import build_bunny_model
from bunny.train.saving import save_lora
from bunny.train.train import lora_target_regex

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # PEFT on transformers 5

# ../shared beside the clone (CI); BUNNY_SHARED_DIR names it elsewhere (a git worktree).
SHARED = Path(os.environ.get("BUNNY_SHARED_DIR") or Path(__file__).resolve().parents[1].parent / "shared")
FIXTURE = SHARED / "fixtures" / "upstream-bunny-tiny"
if not (FIXTURE / "README.md").is_file():
    pytest.skip(f"the upstream Bunny fixture is not at {FIXTURE} (../shared beside the clone, or set "
                "BUNNY_SHARED_DIR)", allow_module_level=True)

TOLERANCE = 1e-4  # float32 logits vs the original's
MERGED = {"recipe-1": "merged-recipe-1", "recipe-2": "merged-recipe-2-unfrozen-tower"}
LORA = {"recipe-1": "lora-recipe-1", "recipe-2": "lora-recipe-2-unfrozen-tower"}
TOWER = FIXTURE / "siglip-tiny"
LLM = FIXTURE / "phi3-tiny"
PEFT_TOWER = "base_model.model.model.vision_tower.vision_tower."


@pytest.fixture(scope="module")
def probe():
    return torch.load(FIXTURE / "reference" / "probe_inputs.pt", weights_only=True)


def reference_logits(name: str) -> torch.Tensor:
    return torch.load(FIXTURE / "reference" / f"{name}.logits.pt", weights_only=True)


@torch.no_grad()
def probe_logits(model, probe) -> torch.Tensor:
    return model.eval()(input_ids=probe["input_ids"], images=probe["images"]).logits


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def full_siglip_keys() -> set[str]:
    """Every tensor of the base SigLIP checkpoint, as transformers 4 names them: what the
    original's tower module (``SiglipVisionModel`` under ``vision_tower``) holds."""
    return set(load_file(TOWER / "model.safetensors"))


class OriginalTower(nn.Module):
    """The original's ``SiglipVisionTower`` as far as loading goes: a transformers-4
    ``SiglipVisionModel`` (``vision_model.*``) under ``vision_tower``. Independent of
    ``bunny.model``: built from transformers' own class."""

    def __init__(self):
        super().__init__()
        self.vision_tower = nn.Module()
        self.vision_tower.vision_model = SiglipVisionModel(SiglipVisionConfig.from_pretrained(TOWER))


def load_tower_as_the_original_does(state: dict[str, torch.Tensor]) -> OriginalTower:
    """The original builder's tower load: ``{k[19:]: v for k starting 'model.vision_tower.'}``
    then ``load_state_dict(strict=True)``: raises on any missing or unexpected key."""
    tower = OriginalTower()
    tower.load_state_dict({k[19:]: v for k, v in state.items() if k.startswith("model.vision_tower.")}, strict=True)
    return tower


# --- reading the original's files ----------------------------------------------------
@pytest.mark.parametrize("recipe", ["recipe-1", "recipe-2"])
def test_the_originals_merged_models_load_and_reproduce_its_logits(recipe, probe, monkeypatch):
    monkeypatch.chdir(FIXTURE)  # their configs name the tower "siglip-tiny", relative to here
    model, info = AutoModelForCausalLM.from_pretrained(MERGED[recipe], dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert max_diff(probe_logits(model, probe), reference_logits(MERGED[recipe])) <= TOLERANCE


def test_a_tower_path_that_is_not_a_local_folder_needs_vision_tower(probe, tmp_path):
    """The published Bunny-v1.0-4B names a hub id: the error names the field, the override works."""
    folder = tmp_path / "published"
    shutil.copytree(FIXTURE / MERGED["recipe-2"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["mm_vision_tower"] = "google/siglip-so400m-patch14-384"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="mm_vision_tower 'google/siglip-so400m-patch14-384' is not a local folder.*vision_tower="):
        AutoModelForCausalLM.from_pretrained(folder)
    with pytest.raises(ValueError, match=f"vision_tower {tmp_path / 'typo'}: folder not found"):
        AutoModelForCausalLM.from_pretrained(folder, vision_tower=tmp_path / "typo")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, vision_tower=TOWER)
    assert max_diff(probe_logits(model, probe), reference_logits(MERGED["recipe-2"])) <= TOLERANCE
    assert model.config.mm_vision_tower == str(TOWER)


@pytest.mark.parametrize("recipe", ["recipe-1", "recipe-2"])
def test_the_originals_lora_runs_merge_here(recipe, probe, tmp_path, monkeypatch, capsys):
    """``--dtype float16``: the original merges in float16, so its reference is float16
    weights; in float32 the same merge differs from it by float16's rounding only."""
    monkeypatch.chdir(FIXTURE)
    out = tmp_path / "merged"
    code = merge_main(["--model-path", LORA[recipe], "--model-base", "phi3-tiny", "--model-type", "phi-3",
                       "--save-model-path", str(out), "--dtype", "float16"])
    assert code == 0, capsys.readouterr().err
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert max_diff(probe_logits(model, probe), reference_logits(MERGED[recipe])) <= TOLERANCE
    # The same tensors, under the same names, as the original's merge script wrote, up to
    # float16 rounding: the direct merge rounds W + delta once; the original (PEFT) rounds
    # the delta first (half an ulp of delta, 2^-11 |delta|), then the sum (2^-11 |merged|).
    # Bit for bit through PEFT's merge, which the original uses.
    ours = {k: v for shard in out.glob("model-*.safetensors") for k, v in load_file(shard).items()}
    theirs = load_file(FIXTURE / MERGED[recipe] / "model.safetensors")
    base = load_file(LLM / "model.safetensors")
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        delta = (value.float() - base[key]).abs() if key in base else torch.zeros_like(value, dtype=torch.float32)
        bound = 2**-10 * (value.float().abs() + delta) + 2**-24  # 2^-24: float16's subnormal spacing
        assert bool(((ours[key].float() - value.float()).abs() <= bound).all()), key
    merge_lora(LORA[recipe], "phi3-tiny", tmp_path / "peft", dtype="float16", merge_method="peft")
    through_peft = {k: v for shard in (tmp_path / "peft").glob("model-*.safetensors") for k, v in load_file(shard).items()}
    assert all(torch.equal(through_peft[k], theirs[k]) for k in theirs)
    config = json.loads((out / "config.json").read_text())
    assert config["unfreeze_vision_tower"] is (recipe == "recipe-2")


def test_average_takes_the_originals_merged_folders(probe, tmp_path, monkeypatch):
    monkeypatch.chdir(FIXTURE)
    out = tmp_path / "average"
    average_checkpoints([FIXTURE / MERGED["recipe-1"], FIXTURE / MERGED["recipe-2"]], out, [0.3, 0.7])
    averaged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    one = load_file(FIXTURE / MERGED["recipe-1"] / "model.safetensors")
    two = load_file(FIXTURE / MERGED["recipe-2"] / "model.safetensors")
    state = averaged.state_dict()
    for key in one:  # the model holds the average of every tensor, the tower's included
        expected = (0.3 * one[key].float() + 0.7 * two[key].float()).half().float()
        torch.testing.assert_close(state[key], expected, atol=1e-3, rtol=0)
    assert torch.isfinite(probe_logits(averaged, probe)).all()


def test_pretrain_mm_mlp_adapter_takes_the_originals_projector():
    model = build_bunny_model(LLM, "phi-3", TOWER, "mlp2x_gelu", pretrain_mm_mlp_adapter=FIXTURE / "pretrain" / "mm_projector.bin")
    saved = torch.load(FIXTURE / "pretrain" / "mm_projector.bin", weights_only=True)
    state = model.state_dict()
    assert all(torch.equal(state[key], value) for key, value in saved.items())


# --- writing files the original reads ------------------------------------------------
@pytest.fixture(scope="module")
def our_recipe_2(tmp_path_factory):
    """What ``train.py --lora_enable True --unfreeze_vision_tower True`` writes, on the
    fixture's base LLM and tower (so the original's merged files are a key-for-key reference)."""
    torch.manual_seed(0)
    model = build_bunny_model(LLM, "phi-3", TOWER, "mlp2x_gelu", dtype=torch.float32)
    model.config.unfreeze_vision_tower = True
    model.requires_grad_(False)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=lora_target_regex(model), task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    peft_model.get_base_model().get_model().mm_projector.requires_grad_(True)
    peft_model.get_base_model().get_model().vision_tower.requires_grad_(True)
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
    folder = tmp_path_factory.mktemp("ours") / "recipe-2"
    save_lora(peft_model, folder, True, (AutoTokenizer.from_pretrained(LLM), AutoImageProcessor.from_pretrained(TOWER)))
    return folder


def test_non_lora_trainables_name_and_hold_the_tower_as_the_original(our_recipe_2):
    saved = torch.load(our_recipe_2 / "non_lora_trainables.bin", weights_only=True)
    theirs = torch.load(FIXTURE / LORA["recipe-2"] / "non_lora_trainables.bin", weights_only=True)
    assert set(saved) == set(theirs)
    assert {k.removeprefix(PEFT_TOWER) for k in saved if k.startswith(PEFT_TOWER)} == full_siglip_keys()
    # The original builder's renaming of a LoRA run's file, then its strict tower load.
    renamed = {k[11:] if k.startswith("base_model.") else k: v for k, v in saved.items()}
    renamed = {k[6:] if k.startswith("model.") else k: v for k, v in renamed.items()}
    load_tower_as_the_original_does(renamed)
    # The parts after the feature layer are the base tower's, unchanged; the rest trained.
    base = load_file(TOWER / "model.safetensors")
    assert torch.equal(saved[PEFT_TOWER + "vision_model.head.probe"], base["vision_model.head.probe"])
    assert torch.equal(saved[PEFT_TOWER + "vision_model.encoder.layers.1.mlp.fc1.weight"], base["vision_model.encoder.layers.1.mlp.fc1.weight"])
    assert not torch.equal(saved[PEFT_TOWER + "vision_model.encoder.layers.0.mlp.fc1.weight"], base["vision_model.encoder.layers.0.mlp.fc1.weight"])


@pytest.fixture(scope="module")
def our_merged(our_recipe_2, tmp_path_factory):
    out = tmp_path_factory.mktemp("ours-merged") / "merged"
    merge_lora(our_recipe_2, LLM, out, "phi-3", dtype="float16")  # the original's merges are float16
    return out


def test_our_merged_model_is_what_the_originals_loader_reads(our_merged, our_recipe_2):
    state = {k: v for shard in our_merged.glob("model-*.safetensors") for k, v in load_file(shard).items()}
    assert set(state) == set(load_file(FIXTURE / MERGED["recipe-2"] / "model.safetensors"))
    load_tower_as_the_original_does(state)
    config = json.loads((our_merged / "config.json").read_text())
    # The fields the original's builder and model read: the architecture, the tower's folder
    # (its SiglipVisionTower loads it; "sig" in the name picks SigLIP), the projector, and
    # unfreeze_vision_tower, without which it would reload the untrained tower.
    assert config["model_type"] == "bunny-phi3" and config["architectures"] == ["BunnyPhi3ForCausalLM"]
    assert Path(config["mm_vision_tower"]) == TOWER and "sig" in config["mm_vision_tower"]
    assert config["mm_hidden_size"] == 32 and config["mm_projector_type"] == "mlp2x_gelu"
    assert config["unfreeze_vision_tower"] is True
    # transformers 4 reads RoPE and dtype under their old names only (else: silent defaults).
    assert config["rope_theta"] == json.loads((LLM / "config.json").read_text())["rope_parameters"]["rope_theta"]
    assert config["rope_scaling"] is None and config["torch_dtype"] == "float16"
    run_config = json.loads((our_recipe_2 / "config.json").read_text())
    assert run_config["rope_theta"] == config["rope_theta"] and run_config["torch_dtype"] == "float32"
    assert SiglipVisionConfig.from_pretrained(config["mm_vision_tower"]).hidden_size == config["mm_hidden_size"]


def test_our_averaged_model_is_what_the_originals_loader_reads(our_merged, probe, tmp_path, monkeypatch):
    """Averaging one of ours with one of theirs: the layouts are the same, tensor for tensor."""
    monkeypatch.chdir(FIXTURE)
    out = tmp_path / "average"
    average_checkpoints([FIXTURE / MERGED["recipe-1"], our_merged], out, [0.3, 0.7])
    state = {k: v for shard in out.glob("model-*.safetensors") for k, v in load_file(shard).items()}
    assert set(state) == set(load_file(FIXTURE / MERGED["recipe-1"] / "model.safetensors"))
    load_tower_as_the_original_does(state)
    assert json.loads((out / "config.json").read_text())["unfreeze_vision_tower"] is True
    assert torch.isfinite(probe_logits(AutoModelForCausalLM.from_pretrained(out), probe)).all()


def test_our_earlier_non_lora_files_still_merge(our_recipe_2, our_merged, probe, tmp_path):
    """This project's earlier files: tower keys without ``vision_model.``, only the layers
    that compute the features. Read as they are; the rest comes from the base tower."""
    legacy = tmp_path / "legacy-run"
    shutil.copytree(our_recipe_2, legacy)
    saved = torch.load(legacy / "non_lora_trainables.bin", weights_only=True)
    unused = (".encoder.layers.1.", ".post_layernorm.", ".head.")
    old = {k.replace("vision_tower.vision_tower.vision_model.", "vision_tower.vision_tower."): v
           for k, v in saved.items() if not any(part in k for part in unused)}
    assert len(old) < len(saved) and not any("vision_model." in k for k in old)
    torch.save(old, legacy / "non_lora_trainables.bin")
    out = tmp_path / "merged"
    merge_lora(legacy, LLM, out, "phi-3", dtype="float16", vision_tower=TOWER)
    again = {k: v for shard in out.glob("model-*.safetensors") for k, v in load_file(shard).items()}
    first = {k: v for shard in our_merged.glob("model-*.safetensors") for k, v in load_file(shard).items()}
    assert set(again) == set(first) and all(torch.equal(again[k], first[k]) for k in first)


def test_our_earlier_merged_folders_are_refused_by_name_and_upgrade_once(our_merged, probe, tmp_path):
    """An earlier merged folder (tower keys without ``vision_model.``, used layers only) would
    load a random tower: refused, naming the upgrade; the upgrade restores the layout."""
    from bunny.merge.shards import write_sharded
    from bunny.merge.upgrade import main as upgrade_main

    state = {k: v for shard in our_merged.glob("model-*.safetensors") for k, v in load_file(shard).items()}
    unused = (".encoder.layers.1.", ".post_layernorm.", ".head.")
    earlier = {k.replace("vision_tower.vision_tower.vision_model.", "vision_tower.vision_tower."): v
               for k, v in state.items() if not any(part in k for part in unused)}
    old = tmp_path / "old"
    shutil.copytree(our_merged, old, ignore=shutil.ignore_patterns("model*.safetensors*"))
    write_sharded(earlier, old, 10**9)
    with pytest.raises(ValueError, match=f"{old} names its vision tower's tensors as this project's earlier.*bunny.merge.upgrade"):
        AutoModelForCausalLM.from_pretrained(old)
    assert upgrade_main([str(old), str(tmp_path / "new")]) == 0
    upgraded = {k: v for shard in (tmp_path / "new").glob("model-*.safetensors") for k, v in load_file(shard).items()}
    assert set(upgraded) == set(state) and all(torch.equal(upgraded[k], state[k]) for k in state)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "new", dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(our_merged, dtype=torch.float32)
    assert torch.equal(probe_logits(model, probe), probe_logits(reference, probe))

"""The Bunny model: projectors, vision tower cut, image splicing, loss, Auto-class loading."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    SiglipVisionConfig,
    SiglipVisionModel,
)

import bunny  # noqa: F401
from bunny.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX as IMG
from bunny.model import VisionTower, build_projector, splice_image_features
from bunny.model.builder import build_bunny_model
from bunny.model.multimodal import load_projector_weights

LLM_SHAPE = dict(vocab_size=96, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)
TOWER_SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=32, patch_size=8)
PATCHES = (32 // 8) ** 2


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("model-parts")
    torch.manual_seed(0)
    specials = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    Phi3ForCausalLM(Phi3Config(**LLM_SHAPE, **specials)).save_pretrained(root / "phi3")
    LlamaForCausalLM(LlamaConfig(**LLM_SHAPE, **specials)).save_pretrained(root / "llama")
    Qwen2ForCausalLM(Qwen2Config(**LLM_SHAPE, **specials)).save_pretrained(root / "qwen2")
    SiglipVisionModel(SiglipVisionConfig(**TOWER_SHAPE)).save_pretrained(root / "siglip")
    CLIPVisionModel(CLIPVisionConfig(**TOWER_SHAPE)).save_pretrained(root / "clip")
    return root


def batch():
    input_ids = torch.tensor([[1, 5, IMG, 7, 8, 9], [1, 5, 6, 7, 0, 0], [1, IMG, 4, 0, 0, 0]])
    attention_mask = (torch.arange(6) < torch.tensor([[6], [4], [3]])).long()
    labels = torch.tensor([[-100, -100, -100, 7, 8, 9], [-100, -100, 6, 7, -100, -100], [-100, -100, 4, -100, -100, -100]])
    return input_ids, attention_mask, labels


# --- projector ----------------------------------------------------------------------
def test_projector_layouts():
    mlp = build_projector("mlp3x_gelu", 8, 16)
    assert [type(m).__name__ for m in mlp] == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    assert mlp[0].in_features == 8 and mlp[4].out_features == 16
    assert sorted(build_projector("mlp2x_gelu", 8, 16).state_dict()) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert build_projector("linear", 8, 16)(torch.zeros(1, 8)).shape == (1, 16)
    x = torch.randn(2, 8)
    assert torch.equal(build_projector("identity", 8, 8)(x), x)
    with pytest.raises(ValueError, match="--mm_projector_type 'mlp2x_relu'"):
        build_projector("mlp2x_relu", 8, 16)
    with pytest.raises(ValueError, match="identity needs equal widths"):
        build_projector("identity", 8, 16)


# --- vision tower -------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["siglip", "clip"])
def test_tower_features_are_the_second_to_last_layer(parts, kind):
    model_class = SiglipVisionModel if kind == "siglip" else CLIPVisionModel
    reference = model_class.from_pretrained(parts / kind)
    pixels = torch.randn(2, 3, 32, 32)
    expected = reference(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    if kind == "clip":
        expected = expected[:, 1:]  # CLIP's CLS token is dropped
    tower = VisionTower.from_pretrained(parts / kind)
    assert tower.num_feature_layers == TOWER_SHAPE["num_hidden_layers"] - 1
    features = tower(pixels)
    assert features.shape == (2, PATCHES, 32)
    torch.testing.assert_close(features, expected)


# --- splicing -----------------------------------------------------------------------
def naive_splice(input_ids, attention_mask, labels, features, embed):
    """One row at a time, the obvious way: the reference for the vectorised splice."""
    rows, row_labels, image = [], [], 0
    for ids, mask, lab in zip(input_ids, attention_mask, labels):
        parts, part_labels = [], []
        for token, keep, label in zip(ids.tolist(), mask.tolist(), lab.tolist()):
            if not keep:
                continue
            if token == IMG:
                parts.append(features[image])
                part_labels += [IGNORE_INDEX] * features.shape[1]
                image += 1
            else:
                parts.append(embed(torch.tensor([token])))
                part_labels.append(label)
        rows.append(torch.cat(parts))
        row_labels.append(torch.tensor(part_labels))
    return rows, row_labels


def test_splice_matches_a_per_row_reference():
    torch.manual_seed(0)
    embed = torch.nn.Embedding(20, 4)
    input_ids, attention_mask, labels = batch()
    features = torch.randn(2, 3, 4)
    embeds, mask, new_labels = splice_image_features(input_ids, attention_mask, labels, features, embed)
    rows, row_labels = naive_splice(input_ids, attention_mask, labels, features, embed)
    assert embeds.shape == (3, max(len(r) for r in rows), 4)
    for i, (row, lab) in enumerate(zip(rows, row_labels)):
        n = len(row)
        torch.testing.assert_close(embeds[i, :n], row)
        assert torch.equal(new_labels[i, :n], lab)
        assert mask[i, :n].all() and not mask[i, n:].any()
        assert (new_labels[i, n:] == IGNORE_INDEX).all()
    # image positions are never trained
    assert (new_labels[0, 2 : 2 + 3] == IGNORE_INDEX).all()


def test_splice_truncates_and_pads_left():
    torch.manual_seed(0)
    embed = torch.nn.Embedding(20, 4)
    input_ids, attention_mask, labels = batch()
    features = torch.randn(2, 3, 4)
    embeds, mask, new_labels = splice_image_features(input_ids, attention_mask, labels, features, embed, max_length=5)
    assert embeds.shape[1] == 5 and mask.sum(1).tolist() == [5, 4, 5]
    left, left_mask, _ = splice_image_features(input_ids, attention_mask, labels, features, embed, pad_left=True)
    right, right_mask, _ = splice_image_features(input_ids, attention_mask, labels, features, embed)
    assert left_mask[1].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    torch.testing.assert_close(left[1, 4:], right[1, :4])


def test_splice_refuses_a_wrong_image_count():
    embed = torch.nn.Embedding(20, 4)
    input_ids, attention_mask, labels = batch()
    with pytest.raises(ValueError, match="2 image placeholders but 1 images"):
        splice_image_features(input_ids, attention_mask, labels, torch.randn(1, 3, 4), embed)


# --- the full model -----------------------------------------------------------------
@pytest.mark.parametrize("family", ["phi-3", "llama", "qwen2"])
def test_families_train_and_load_through_auto_classes(parts, family, tmp_path):
    llm = {"phi-3": "phi3", "llama": "llama", "qwen2": "qwen2"}[family]
    model = build_bunny_model(parts / llm, family, parts / "siglip", "mlp2x_gelu")
    input_ids, attention_mask, labels = batch()
    images = torch.randn(2, 3, 32, 32)
    model.train()
    train_loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, images=images).loss
    model.eval()
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, images=images)
    # the supervised-positions-only loss equals the family's loss over full logits
    torch.testing.assert_close(train_loss, out.loss)
    model.save_pretrained(tmp_path / "saved")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    assert type(loaded) is type(model)
    again = loaded(input_ids=input_ids, attention_mask=attention_mask, images=images).logits
    torch.testing.assert_close(again, out.logits)


def test_text_only_batches_and_generation(parts):
    model = build_bunny_model(parts / "phi3", "phi-3", parts / "siglip", "mlp2x_gelu").eval()
    text_only = torch.tensor([[1, 5, 6, 7]])
    plain = Phi3ForCausalLM.from_pretrained(parts / "phi3").eval()
    torch.testing.assert_close(model(input_ids=text_only).logits, plain(input_ids=text_only).logits)
    generated = model.generate(torch.tensor([[1, 5, IMG, 7]]), images=torch.randn(1, 3, 32, 32), max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 3)


def test_unfrozen_tower_receives_gradients_and_frozen_one_builds_no_graph(parts):
    model = build_bunny_model(parts / "phi3", "phi-3", parts / "siglip", "mlp2x_gelu").train()
    input_ids, attention_mask, labels = batch()
    images = torch.randn(2, 3, 32, 32)
    model.requires_grad_(False)
    tower = model.get_vision_tower()
    assert not tower(images).requires_grad
    tower.requires_grad_(True)
    model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, images=images).loss.backward()
    params = dict(tower.named_parameters())
    # The last layer, the post-layernorm and the head stay in the module (the checkpoint
    # layout) but never run: they stay frozen, so no trainable parameter lacks a gradient.
    unused = {n for n in params if n.startswith(("vision_tower.vision_model.encoder.layers.2.",
                                                   "vision_tower.vision_model.post_layernorm.",
                                                   "vision_tower.vision_model.head."))}
    assert unused == tower.unused_parameter_names() and len(unused) > 10
    assert all(not params[n].requires_grad and params[n].grad is None for n in unused)
    grads = [p.grad for n, p in params.items() if n not in unused]
    assert all(p.requires_grad for n, p in params.items() if n not in unused)
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_projector_weights_file_checks(parts, tmp_path):
    projector = build_projector("mlp2x_gelu", 32, 48)
    good = {f"model.mm_projector.{k}": v for k, v in build_projector("mlp2x_gelu", 32, 48).state_dict().items()}
    torch.save(good, tmp_path / "good.bin")
    load_projector_weights(projector, tmp_path / "good.bin")
    torch.testing.assert_close(projector[0].weight, good["model.mm_projector.0.weight"])
    torch.save({f"model.mm_projector.{k}": v for k, v in build_projector("linear", 32, 48).state_dict().items()}, tmp_path / "linear.bin")
    with pytest.raises(ValueError, match=r"linear.bin does not fit --mm_projector_type: missing keys \['0.bias', '0.weight', '2.bias', '2.weight'\], unexpected keys \['bias', 'weight'\]"):
        load_projector_weights(projector, tmp_path / "linear.bin")
    torch.save({f"model.mm_projector.{k}": v for k, v in build_projector("mlp2x_gelu", 16, 48).state_dict().items()}, tmp_path / "narrow.bin")
    with pytest.raises(ValueError, match=r"narrow.bin: shape mismatch \(0.weight: file \(48, 16\) vs model \(48, 32\)\)"):
        load_projector_weights(projector, tmp_path / "narrow.bin")
    with pytest.raises(FileNotFoundError, match="--pretrain_mm_mlp_adapter .*missing.bin"):
        load_projector_weights(projector, tmp_path / "missing.bin")


def test_builder_errors_name_the_flag(parts, tmp_path):
    with pytest.raises(ValueError, match="--model_type 'gpt-9'"):
        build_bunny_model(parts / "phi3", "gpt-9", parts / "siglip", "mlp2x_gelu")
    with pytest.raises(FileNotFoundError, match="--vision_tower"):
        build_bunny_model(parts / "phi3", "phi-3", tmp_path / "nowhere", "mlp2x_gelu")
    with pytest.raises(FileNotFoundError, match="--model_name_or_path"):
        build_bunny_model(tmp_path, "phi-3", parts / "siglip", "mlp2x_gelu")
    with pytest.raises(ValueError, match="is a 'llama' model, but --model_type phi-3"):
        build_bunny_model(parts / "llama", "phi-3", parts / "siglip", "mlp2x_gelu")


def test_text_only_batches_still_give_trainable_vision_parameters_a_gradient(parts):
    """Under ZeRO-3 a trainable parameter without a gradient breaks the reduction step."""
    model = build_bunny_model(parts / "phi3", "phi-3", parts / "siglip", "mlp2x_gelu").train()
    model.requires_grad_(False)
    model.get_model().mm_projector.requires_grad_(True)
    model.get_vision_tower().requires_grad_(True)
    input_ids = torch.tensor([[1, 5, 6, 7]])
    labels = torch.tensor([[-100, 5, 6, 7]])
    reference = model(input_ids=input_ids, labels=labels).loss
    model.zero_grad()
    loss = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels).loss
    loss.backward()
    torch.testing.assert_close(loss, reference)
    vision = [p for p in (*model.get_vision_tower().parameters(), *model.get_model().mm_projector.parameters()) if p.requires_grad]
    assert all(p.grad is not None for p in vision)
    assert all(p.grad.abs().sum() == 0 for p in vision)  # present, and zero: the loss is unchanged

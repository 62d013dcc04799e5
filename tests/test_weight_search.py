"""The averaging-weight search on models whose best weights are known by construction.

The models differ only in ``lm_head``: ``W + t * D`` for directions ``D`` orthogonal (in the
Frobenius inner product) to the gradient ``G`` of the validation answer loss at ``W``. The loss
is convex in the logits, and the logits are linear in ``t``, so along such a line the loss is
convex with zero slope at ``t = 0``: the base ``W`` is the best point of the line, and every
other point is worse. ``G`` comes from the model's own training-mode loss (independent of
``bunny.evaluate``), so the searches below must find exactly the weighting that gives back ``W``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoImageProcessor, AutoTokenizer

from bunny.cli import UserError
from bunny.data import DataCollator, SupervisedDataset
from bunny.evaluate import load_eval_data
from bunny.evaluate.search import answer_loss_scorer, search_average_weights
from bunny.model.builder import build_bunny_model

LM_HEAD = "lm_head.weight"


def orthogonal_direction(gradient: torch.Tensor, scale: float, seed: int) -> torch.Tensor:
    direction = torch.randn(gradient.shape, generator=torch.Generator().manual_seed(seed)) * scale
    return direction - (direction * gradient).sum() / (gradient * gradient).sum() * gradient


@pytest.fixture(scope="module")
def construction(tiny_assets, tmp_path_factory):
    """(base model, lm_head W, loss gradient G at W, validation data, a folder to save variants in)."""
    root = tmp_path_factory.mktemp("weight-search")
    records = json.loads(tiny_assets.heldout_data.read_text())[:8]
    data_path = root / "validation.json"
    data_path.write_text(json.dumps(records))
    torch.manual_seed(7)
    model = build_bunny_model(tiny_assets.llm, "phi-3", tiny_assets.vision_tower, "mlp2x_gelu", dtype=torch.float32)
    model.config.image_aspect_ratio = "pad"
    model.config.tokenizer_model_max_length = 256
    tokenizer = AutoTokenizer.from_pretrained(tiny_assets.llm)
    processor = AutoImageProcessor.from_pretrained(tiny_assets.vision_tower)
    dataset = SupervisedDataset(data_path, tokenizer, processor, "phi3", tiny_assets.finetune_images, "pad", 256)
    batch = DataCollator(tokenizer)([dataset[i] for i in range(len(dataset))])
    batch.pop("mismatched_ids")
    model.train()
    model.requires_grad_(False)
    model.lm_head.weight.requires_grad_(True)
    model(**batch).loss.backward()
    gradient = model.lm_head.weight.grad.detach().clone()
    model.lm_head.weight.grad = None
    model.eval()
    base = model.lm_head.weight.detach().clone()

    def save(name: str, head: torch.Tensor) -> Path:
        folder = root / name
        with torch.no_grad():
            model.lm_head.weight.copy_(head)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        processor.save_pretrained(folder)
        return folder

    data = load_eval_data(data_path, tiny_assets.finetune_images)
    return base, gradient, data, save


def saved_head(folder: Path) -> torch.Tensor:
    for shard in folder.glob("*.safetensors"):
        with safe_open(shard, framework="pt") as handle:
            if LM_HEAD in handle.keys():
                return handle.get_tensor(LM_HEAD)
    raise AssertionError(f"no {LM_HEAD} in {folder}")


def test_two_models_grid_finds_the_known_weight(construction, tmp_path):
    base, gradient, data, save = construction
    direction = orthogonal_direction(gradient, 0.1, seed=1)
    # 0.3 * first + 0.7 * second == base
    first, second = save("grid-first", base + 0.7 * direction), save("grid-second", base - 0.3 * direction)
    scratch = tmp_path / "scratch"
    result = search_average_weights(
        [first, second], answer_loss_scorer(data, device="cpu"), grid=[0.0, 0.1, 0.3, 0.5, 1.0],
        output_dir=tmp_path / "chosen", scratch_dir=scratch,
    )
    assert result.method == "grid"
    assert [c.weights for c in result.curve] == [(0.0, 1.0), (0.1, 0.9), (0.3, 0.7), (0.5, 0.5), (1.0, 0.0)]
    losses = [c.loss for c in result.curve]
    assert result.weights == (0.3, 0.7) and result.loss == min(losses)
    assert losses[0] > losses[1] > losses[2] < losses[3] < losses[4]  # convex along the line
    assert torch.allclose(saved_head(tmp_path / "chosen"), base, atol=1e-6)
    assert list(scratch.iterdir()) == []  # every candidate deleted


def test_greedy_soup_of_three_keeps_the_models_that_help(construction, tmp_path):
    base, gradient, data, save = construction
    helpful = orthogonal_direction(gradient, 0.1, seed=2)
    harmful = orthogonal_direction(gradient, 0.3, seed=3)
    # first and second average back to the base; adding the third moves it by harmful / 3
    models = [save("soup-a", base + helpful), save("soup-b", base - helpful), save("soup-c", base + harmful)]
    result = search_average_weights(models, answer_loss_scorer(data, device="cpu"), scratch_dir=tmp_path)
    assert result.method == "greedy_soup"
    alone = {c.weights: c.loss for c in result.curve[:3]}
    assert alone[(0.0, 0.0, 1.0)] > max(alone[(1.0, 0.0, 0.0)], alone[(0.0, 1.0, 0.0)])  # the construction's premise
    tried = [c.weights for c in result.curve[3:]]
    assert tried == [(0.5, 0.5, 0.0), (1 / 3, 1 / 3, 1 / 3)]
    assert result.weights == (0.5, 0.5, 0.0)
    assert result.loss == result.curve[3].loss < min(alone.values())
    assert result.curve[4].loss > result.curve[3].loss


def test_inputs_are_checked_before_anything_is_scored(construction, tmp_path):
    base, _gradient, _data, save = construction
    folder = save("lonely", base)

    def never(_folder):
        raise AssertionError("scored")

    with pytest.raises(UserError, match="model folder not found"):
        search_average_weights([folder, tmp_path / "missing"], never)
    with pytest.raises(UserError, match="weight grid"):
        search_average_weights([folder, folder], never, grid=[0.5, 1.5])
    with pytest.raises(UserError, match="at least two models"):
        search_average_weights([folder], never)


def test_cli_writes_the_chosen_average_and_the_curve(construction, tmp_path, capsys):
    from bunny.evaluate.search_weights import main

    base, gradient, data, save = construction
    direction = orthogonal_direction(gradient, 0.1, seed=4)
    first, second = save("cli-first", base + 0.5 * direction), save("cli-second", base - 0.5 * direction)
    curve = tmp_path / "curve.json"
    assert main([str(first), str(second), "--data", str(data.path), "--image_folder", str(data.image_folder),
                 "--grid", "1.0", "0.5", "--output", str(tmp_path / "avg"), "--curve", str(curve), "--device", "cpu"]) == 0
    result = json.loads(curve.read_text())
    assert result["weights"] == [0.5, 0.5] and [c["weights"] for c in result["curve"]] == [[1.0, 0.0], [0.5, 0.5]]
    assert result["curve"][1]["loss"] < result["curve"][0]["loss"]
    assert torch.allclose(saved_head(tmp_path / "avg"), base, atol=1e-6)
    assert "chosen (grid): 0.5 / 0.5" in capsys.readouterr().out
    assert main([str(first), str(second), "--data", str(data.path), "--grid", "2"]) == 2
    assert "weight grid must be" in capsys.readouterr().err

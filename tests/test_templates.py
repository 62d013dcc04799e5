"""Golden tests of the Llama-3 and Qwen2 templates, the stop-string check, and the decoded
cross-check of the label masking (a tokenizer whose offsets do not match its text is caught)."""

from __future__ import annotations

import json

import pytest

from bunny.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from bunny.conversation import (
    _encode,
    _labels,
    _render,
    build_prompt,
    check_template_fits,
    default_template,
    get_template,
    tokenize_conversation,
)
from bunny.tiny.models import build_tiny_byte_level_tokenizer
from bunny.tiny.tokenizer import build_tiny_tokenizer

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
SINGLE = [{"from": "human", "value": "<image>\nWhat color is the shape?"}, {"from": "gpt", "value": "Red."}]
MULTI = [
    {"from": "human", "value": "How many shapes are there?\n<image>"},
    {"from": "gpt", "value": "2."},
    {"from": "human", "value": "Is it large?"},
    {"from": "gpt", "value": "Yes, a big circle."},
]
TEXT_ONLY = [{"from": "human", "value": "What is 2 + 3?"}, {"from": "gpt", "value": "5."}]
STOP = {"llama3": "<|end_of_text|>", "qwen2": "<|endoftext|>"}


@pytest.fixture(scope="module", params=["llama3", "qwen2"])
def family(request):
    """(template name, its family's tiny byte-level tokenizer)."""
    return request.param, build_tiny_byte_level_tokenizer(request.param)


def trained(sample) -> list[int]:
    return [position for position, label in enumerate(sample.labels) if label != IGNORE_INDEX]


def trained_tokens(sample, tokenizer) -> list[str]:
    return tokenizer.convert_ids_to_tokens([sample.labels[p] for p in trained(sample)])


def test_templates_per_family_and_the_original_names():
    assert [default_template(t) for t in ("phi-3", "llama", "qwen2")] == ["phi3", "llama3", "qwen2"]
    assert get_template("bunny") == get_template("phi3") and get_template("llama") == get_template("llama3")
    assert {name: get_template(name).answer_end for name in ("phi3", "llama3", "llama2", "qwen2")} == {
        "phi3": "<|endoftext|>", "llama3": "<|end_of_text|>", "llama2": "</s>", "qwen2": "<|endoftext|>"}
    with pytest.raises(ValueError, match="no default conversation template for --model_type 'gpt-9'"):
        default_template("gpt-9")


def test_prompt_text_is_the_original_layout_with_the_family_stop(family):
    name, _ = family
    assert build_prompt(MULTI, name) == (
        f"{SYSTEM} USER: <image>\nHow many shapes are there? ASSISTANT: 2.{STOP[name]}"
        f"USER: Is it large? ASSISTANT: Yes, a big circle.{STOP[name]}")


def test_single_round_trains_the_answer_from_the_separator_piece(family):
    name, tokenizer = family
    sample = tokenize_conversation(SINGLE, tokenizer, name, has_image=True, max_length=512)
    bos = 1 if name == "llama3" else 0
    assert not sample.mismatch and sample.input_ids.count(IMAGE_TOKEN_INDEX) == 1
    assert (sample.input_ids[0] == tokenizer.bos_token_id) == bool(bos)  # Llama-3's BOS, never trained
    assert trained(sample) == list(range(41 + bos, 46 + bos)) == list(range(41 + bos, len(sample.input_ids)))
    assert trained_tokens(sample, tokenizer) == ["Ġ", "R", "ed", ".", STOP[name]]
    assert tokenizer.convert_ids_to_tokens(sample.input_ids[39 + bos:41 + bos]) == ["ĠASSISTANT", ":"]


def test_multi_round_trains_each_answer_and_its_stop(family):
    name, tokenizer = family
    sample = tokenize_conversation(MULTI, tokenizer, name, has_image=True, max_length=512)
    bos = 1 if name == "llama3" else 0
    assert not sample.mismatch
    assert trained(sample) == [p + bos for p in (47, 48, 49, 50, 60, 61, 62, 63, 64, 65, 66)]
    assert trained_tokens(sample, tokenizer) == [
        "Ġ", "2", ".", STOP[name], "ĠYes", ",", "Ġa", "Ġbig", "Ġcircle", ".", STOP[name]]
    assert tokenizer.decode(sample.input_ids[51 + bos:60 + bos]) == "USER: Is it large? ASSISTANT:"
    assert all(label == IGNORE_INDEX for label in sample.labels[51 + bos:60 + bos])
    assert tokenizer.decode([sample.labels[p] for p in trained(sample)]) == f" 2.{STOP[name]} Yes, a big circle.{STOP[name]}"


def test_text_only_answer_starting_with_a_digit(family):
    name, tokenizer = family
    sample = tokenize_conversation(TEXT_ONLY, tokenizer, name, has_image=False, max_length=512)
    bos = 1 if name == "llama3" else 0
    assert IMAGE_TOKEN_INDEX not in sample.input_ids and not sample.mismatch
    assert trained(sample) == [40 + bos, 41 + bos, 42 + bos, 43 + bos]
    assert trained_tokens(sample, tokenizer) == ["Ġ", "5", ".", STOP[name]]


def test_truncation_inside_an_answer_keeps_the_start(family):
    name, tokenizer = family
    full = tokenize_conversation(MULTI, tokenizer, name, has_image=True, max_length=512)
    cut_at = trained(full)[6] + 1  # inside the second answer, just after "Ġa"
    cut = tokenize_conversation(MULTI, tokenizer, name, has_image=True, max_length=cut_at)
    assert not cut.mismatch
    assert cut.input_ids == full.input_ids[:cut_at] and cut.labels == full.labels[:cut_at]
    assert tokenizer.decode([label for label in cut.labels if label != IGNORE_INDEX]) == f" 2.{STOP[name]} Yes, a"


def test_stop_string_must_be_one_token_and_the_eos():
    llama3, qwen2 = build_tiny_byte_level_tokenizer("llama3"), build_tiny_byte_level_tokenizer("qwen2")
    phi3 = build_tiny_tokenizer()
    check_template_fits("llama3", llama3)
    check_template_fits("qwen2", qwen2)
    check_template_fits("phi3", phi3)
    check_template_fits("plain", llama3)  # pretrain's "\n" needs no stop token
    with pytest.raises(ValueError, match=r"--version 'phi3': its stop string '<\|endoftext\|>' is not one token "
                                         r".*EOS '<\|end_of_text\|>': llama3$"):
        check_template_fits("phi3", llama3)
    with pytest.raises(ValueError, match=r"--version 'llama3': .* not one token .*: phi3, qwen2$"):
        check_template_fits("llama3", qwen2)
    # "</s>" is one token of the Phi-3-style vocabulary, but not its EOS: generation would not stop
    with pytest.raises(ValueError, match=r"--version 'llama2': its stop string '</s>' is a token of this tokenizer "
                                         "but not its EOS"):
        check_template_fits("llama2", phi3)
    check_template_fits("llama2", phi3, stop_ids=[phi3.convert_tokens_to_ids("</s>")])  # a generation-config EOS


def mismatched_qwen2_tokenizer():
    """A Qwen2 tokenizer class over a vocabulary built for SentencePiece's Metaspace
    pre-tokenizer: its byte-level pre-tokenizer maps spaces to pieces the vocabulary lacks, so
    spaces vanish from the ids and the offsets no longer describe what was encoded."""
    from transformers import Qwen2Tokenizer

    model = json.loads(build_tiny_tokenizer(add_bos=False).backend_tokenizer.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return Qwen2Tokenizer(vocab=model["vocab"], merges=merges, unk_token="<unk>",
                          eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def test_a_tokenizer_whose_offsets_do_not_match_its_text_is_caught():
    tokenizer = mismatched_qwen2_tokenizer()
    check_template_fits("qwen2", tokenizer)  # the stop string itself is fine
    conversation = MULTI[:3] + [{"from": "gpt", "value": "Yes, a big circle."}]
    rendered = _render(conversation, get_template("qwen2"), True)
    offset_labels = _labels(_encode(rendered.text, tokenizer, True), rendered)
    assert offset_labels is not None  # the offsets alone report no problem ...
    trained_text = tokenizer.decode([label for label in offset_labels if label != IGNORE_INDEX])
    assert trained_text == "2.<|endoftext|>Yes,abigcircle.<|endoftext|>"  # ... yet not what the answers say
    sample = tokenize_conversation(conversation, tokenizer, "qwen2", has_image=True, max_length=512)
    assert sample.mismatch and set(sample.labels) == {IGNORE_INDEX}
    assert len(sample.input_ids) == len(_encode(rendered.text, tokenizer, True).ids)


@pytest.mark.slow
@pytest.mark.parametrize("family_name, model_type", [("llama3", "llama"), ("qwen2", "qwen2")])
def test_llama_and_qwen2_run_pretrain_lora_merge_with_their_own_template(tiny_assets, tmp_path, family_name, model_type):
    """In process (no launcher): pretrain, then LoRA with the tower unfrozen and no --version
    (the family's template is the default), then merge; the merged model loads and runs."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import bunny  # noqa: F401  (registers the Bunny model types)
    from bunny.merge.merger import merge_lora
    from bunny.tiny.models import save_tiny_llama3, save_tiny_qwen2
    from bunny.train.train import build_trainer, train

    llm = tmp_path / "llm"
    (save_tiny_llama3 if family_name == "llama3" else save_tiny_qwen2)(llm, seed=0)
    common = ["--model_name_or_path", str(llm), "--model_type", model_type, "--vision_tower", str(tiny_assets.vision_tower),
              "--per_device_train_batch_size", "8", "--max_steps", "2", "--save_strategy", "no", "--report_to", "none",
              "--skip_image_check", "True", "--dataloader_num_workers", "0", "--max_mismatch_fraction", "0"]
    pretrain = train(common + ["--tune_mm_mlp_adapter", "True", "--data_path", str(tiny_assets.pretrain_data),
                               "--image_folder", str(tiny_assets.pretrain_images), "--output_dir", str(tmp_path / "pretrain"),
                               "--learning_rate", "1e-3"])
    lora_flags = common + ["--lora_enable", "True", "--lora_r", "4", "--unfreeze_vision_tower", "True",
                           "--mm_projector_lr", "2e-5", "--pretrain_mm_mlp_adapter", str(pretrain / "mm_projector.bin"),
                           "--data_path", str(tiny_assets.recipe2_data), "--image_folder", str(tiny_assets.finetune_images),
                           "--image_aspect_ratio", "pad", "--output_dir", str(tmp_path / "lora")]
    assert build_trainer(lora_flags).train_dataset.template_name == family_name
    lora = train(lora_flags)
    assert json.loads((lora / "training_complete.json").read_text())["tokenization_mismatches"] == 0

    merged = tmp_path / "merged"
    merge_lora(lora, llm, merged)
    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    assert model.config.model_type == f"bunny-{model_type}"
    if family_name == "qwen2":  # tied embeddings stay tied
        assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    tokenizer = AutoTokenizer.from_pretrained(merged)
    sample = tokenize_conversation(SINGLE, tokenizer, family_name, has_image=True, max_length=512)
    images = torch.zeros(1, 3, 32, 32)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([sample.input_ids]), images=images).logits
    assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits).all()

"""Golden tests of the conversation templates: exact prompt text, exact trained tokens."""

from __future__ import annotations

import pytest

from bunny.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from bunny.conversation import (
    TokenizedSample,
    build_prompt,
    generation_prompt,
    get_template,
    tokenize_conversation,
    tokenize_prompt,
)
from bunny.tiny.tokenizer import build_tiny_tokenizer

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
SYSTEM_TOKENS = 23  # the system prompt and its separator take 23 tokens of the tiny tokenizer

PLAIN = [{"from": "human", "value": "Describe it.\n<image>"}, {"from": "gpt", "value": "a red circle."}]
SINGLE = [{"from": "human", "value": "<image>\nWhat color is the shape?"}, {"from": "gpt", "value": "Red."}]
MULTI = [
    {"from": "human", "value": "What shape is shown?\n<image>"},
    {"from": "gpt", "value": "A circle."},
    {"from": "human", "value": "Is it large?"},
    {"from": "gpt", "value": "Yes."},
]
TEXT_ONLY = [{"from": "human", "value": "What is 2 + 3?"}, {"from": "gpt", "value": "5."}]


@pytest.fixture(scope="module", params=[True, False], ids=["bos", "no-bos"])
def tokenizer(request):
    return build_tiny_tokenizer(add_bos=request.param)


def trained(sample: TokenizedSample) -> list[int]:
    return [position for position, label in enumerate(sample.labels) if label != IGNORE_INDEX]


def shift(tokenizer) -> int:
    return 1 if tokenizer.add_bos_token else 0


def test_tiny_tokenizer_is_phi3_like_deterministic_and_round_trips(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    assert 400 <= len(tokenizer) <= 600 and tokenizer.model_max_length == 2048
    assert tokenizer.convert_ids_to_tokens([0, 1, 2, 3]) == ["<unk>", "<s>", "</s>", "<0x00>"]
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>" and tokenizer.bos_token == "<s>"
    for token in ("<|end|>", "<|user|>", "<|assistant|>", "<|system|>", "<|endoftext|>"):
        assert tokenizer.tokenize(f"a{token}b")[1] == token  # one special token, never split
    ids = tokenizer("USER: Hi ASSISTANT: Ok.").input_ids
    assert (ids[0] == tokenizer.bos_token_id) == tokenizer.add_bos_token
    assert build_tiny_tokenizer(add_bos=tokenizer.add_bos_token).get_vocab() == tokenizer.get_vocab()
    assert tokenizer.decode(tokenizer("naïve 7 + 5 = 12.", add_special_tokens=False).input_ids) == "naïve 7 + 5 = 12."
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded("USER: Hi ASSISTANT: Ok.").input_ids == ids and len(reloaded) == len(tokenizer)
    assert reloaded.pad_token_id == reloaded.eos_token_id == tokenizer.eos_token_id


def test_unknown_template_names_the_flag_and_known_ones():
    with pytest.raises(ValueError, match=r"--version 'llava'.*plain, phi3, llama3, llama2, qwen2, bunny, llama"):
        get_template("llava")


def test_plain_prompt_is_placeholder_caption_newline():
    assert build_prompt(PLAIN, "plain") == "<image>a red circle.\n"


def test_phi3_single_round_prompt_moves_nothing_when_image_leads():
    assert build_prompt(SINGLE, "phi3") == (
        f"{SYSTEM} USER: <image>\nWhat color is the shape? ASSISTANT: Red.<|endoftext|>")


def test_phi3_multi_round_prompt_moves_image_to_turn_start():
    assert build_prompt(MULTI, "phi3") == (
        f"{SYSTEM} USER: <image>\nWhat shape is shown? ASSISTANT: A circle.<|endoftext|>"
        "USER: Is it large? ASSISTANT: Yes.<|endoftext|>")


def test_phi3_text_only_prompt():
    assert build_prompt(TEXT_ONLY, "phi3") == f"{SYSTEM} USER: What is 2 + 3? ASSISTANT: 5.<|endoftext|>"


def test_plain_trains_caption_and_newline(tokenizer):
    sample = tokenize_conversation(PLAIN, tokenizer, "plain", has_image=True, max_length=512)
    s = shift(tokenizer)
    assert not sample.mismatch
    assert sample.input_ids[s] == IMAGE_TOKEN_INDEX and sample.input_ids.count(IMAGE_TOKEN_INDEX) == 1
    assert sample.input_ids[:s] == [tokenizer.bos_token_id] * s
    assert trained(sample) == [s + 1, s + 2, s + 3, s + 4, s + 5, s + 6] == list(range(s + 1, len(sample.input_ids)))
    labels = [sample.labels[p] for p in trained(sample)]
    assert tokenizer.convert_ids_to_tokens(labels) == ["▁a", "▁re", "d", "▁circle", ".", "<0x0A>"]
    assert tokenizer.decode(labels) == "a red circle.\n"


def test_phi3_single_round_trains_answer_and_endoftext(tokenizer):
    sample = tokenize_conversation(SINGLE, tokenizer, "phi3", has_image=True, max_length=512)
    s = shift(tokenizer)
    assert not sample.mismatch
    image_at = sample.input_ids.index(IMAGE_TOKEN_INDEX)
    assert image_at == s + SYSTEM_TOKENS + 2
    assert tokenizer.convert_ids_to_tokens(sample.input_ids[image_at - 2:image_at]) == ["▁USER:", "▁"]
    # "Red" has no "▁R" piece: the answer starts with the lone "▁", which generation must emit
    # first after "ASSISTANT:", so it is trained (as the original Bunny trains it)
    assert trained(sample) == [s + 35, s + 36, s + 37, s + 38, s + 39]
    assert len(sample.input_ids) == s + 40
    labels = [sample.labels[p] for p in trained(sample)]
    assert tokenizer.convert_ids_to_tokens(labels) == ["▁", "R", "ed", ".", "<|endoftext|>"]
    assert tokenizer.convert_ids_to_tokens(sample.input_ids[s + 34:s + 36]) == ["▁ASSISTANT:", "▁"]
    assert sample.labels[s + 34] == IGNORE_INDEX


def test_phi3_multi_round_trains_each_answer(tokenizer):
    sample = tokenize_conversation(MULTI, tokenizer, "phi3", has_image=True, max_length=512)
    s = shift(tokenizer)
    assert not sample.mismatch
    assert sample.input_ids.count(IMAGE_TOKEN_INDEX) == 1
    assert trained(sample) == [s + 36, s + 37, s + 38, s + 39, s + 48, s + 49, s + 50]
    labels = [sample.labels[p] for p in trained(sample)]
    # the separator space after "ASSISTANT:" rides in the answer's first token ("▁A", "▁Yes")
    assert tokenizer.convert_ids_to_tokens(labels) == [
        "▁A", "▁circle", ".", "<|endoftext|>", "▁Yes", ".", "<|endoftext|>"]
    assert tokenizer.decode(sample.input_ids[s + 40:s + 48]) == "USER: Is it large? ASSISTANT:"
    assert all(label == IGNORE_INDEX for label in sample.labels[s + 40:s + 48])


def test_phi3_text_only_has_no_image_token(tokenizer):
    sample = tokenize_conversation(TEXT_ONLY, tokenizer, "phi3", has_image=False, max_length=512)
    s = shift(tokenizer)
    assert IMAGE_TOKEN_INDEX not in sample.input_ids
    # a digit never carries "▁" (Llama-2-style vocabularies split " 5" into "▁" and "5"): trained from "▁"
    assert trained(sample) == [s + 32, s + 33, s + 34, s + 35]
    assert tokenizer.convert_ids_to_tokens([sample.labels[p] for p in trained(sample)]) == ["▁", "5", ".", "<|endoftext|>"]
    assert tokenizer.convert_ids_to_tokens(sample.input_ids[s + 31:s + 32]) == ["▁ASSISTANT:"]
    assert sample.labels[s + 31] == IGNORE_INDEX


def test_trained_labels_equal_their_input_ids(tokenizer):
    sample = tokenize_conversation(MULTI, tokenizer, "phi3", has_image=True, max_length=512)
    assert len(sample.labels) == len(sample.input_ids)
    assert all(sample.labels[p] == sample.input_ids[p] for p in trained(sample))


def test_truncation_keeps_the_start(tokenizer):
    full = tokenize_conversation(MULTI, tokenizer, "phi3", has_image=True, max_length=512)
    cut = tokenize_conversation(MULTI, tokenizer, "phi3", has_image=True, max_length=45)
    assert cut.input_ids == full.input_ids[:45] and cut.labels == full.labels[:45]
    assert not cut.mismatch


def test_truncation_that_drops_the_image_is_refused(tokenizer):
    with pytest.raises(ValueError, match="--model_max_length 10 cuts off the image"):
        tokenize_conversation(MULTI, tokenizer, "phi3", has_image=True, max_length=10)


def test_straddling_token_is_a_mismatch_with_all_labels_ignored():
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_tokens(["T: Re"])  # one token across "ASSISTANT:" (untrained) and "Red" (trained)
    sample = tokenize_conversation(SINGLE, tokenizer, "phi3", has_image=True, max_length=512)
    assert "T: Re" in tokenizer.convert_ids_to_tokens([t for t in sample.input_ids if t >= 0])
    assert sample.mismatch
    assert sample.labels == [IGNORE_INDEX] * len(sample.input_ids)
    straddler = sample.input_ids.index(tokenizer.convert_tokens_to_ids("T: Re"))
    cut = tokenize_conversation(SINGLE, tokenizer, "phi3", has_image=True, max_length=straddler)
    assert not cut.mismatch and cut.input_ids == sample.input_ids[:straddler]  # the straddler was cut off


def test_whitespace_rules_at_answer_edges(tokenizer):
    # every piece after "ASSISTANT:" is trained: the separator's lone "▁" and the answer's own spaces
    spaced = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "  Red."}]
    sample = tokenize_conversation(spaced, tokenizer, "phi3", has_image=False, max_length=512)
    tokens = tokenizer.convert_ids_to_tokens(sample.input_ids)
    assert tokens[-8:] == ["▁ASSISTANT:", "▁", "▁", "▁", "R", "ed", ".", "<|endoftext|>"]
    assert [label != IGNORE_INDEX for label in sample.labels[-8:]] == [False] + [True] * 7


def test_image_placeholder_rules():
    tokenizer = build_tiny_tokenizer()
    with pytest.raises(ValueError, match="exactly one <image>"):
        tokenize_conversation(TEXT_ONLY, tokenizer, "phi3", has_image=True, max_length=512)
    with pytest.raises(ValueError, match="text-only sample holds 1 <image>"):
        tokenize_conversation(SINGLE, tokenizer, "phi3", has_image=False, max_length=512)
    with pytest.raises(ValueError, match="alternate human, gpt"):
        tokenize_conversation(SINGLE[::-1], tokenizer, "phi3", has_image=True, max_length=512)


def test_generation_prompt_is_the_training_prefix(tokenizer):
    prompt = generation_prompt("What color is the shape?\n<image>", "phi3", has_image=True)
    assert prompt == f"{SYSTEM} USER: <image>\nWhat color is the shape? ASSISTANT:"
    ids = tokenize_prompt(prompt, tokenizer)
    full = tokenize_conversation(SINGLE, tokenizer, "phi3", has_image=True, max_length=512)
    assert ids == full.input_ids[:len(ids)] and ids[-1] == tokenizer.convert_tokens_to_ids("▁ASSISTANT:")
    assert ids.count(IMAGE_TOKEN_INDEX) == 1
    assert generation_prompt("What is 2 + 3?", "phi3", has_image=False) == f"{SYSTEM} USER: What is 2 + 3? ASSISTANT:"
    assert generation_prompt("anything", "plain", has_image=True) == "<image>"
    assert tokenize_prompt("<image>", tokenizer) == [tokenizer.bos_token_id] * shift(tokenizer) + [IMAGE_TOKEN_INDEX]


@pytest.mark.parametrize("trim_offsets", [False, True])
def test_byte_level_tokenizer_trains_every_token_after_the_role(trim_offsets):
    """A GPT-2-style tokenizer (space glued to the next word, offsets optionally trimmed)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=trim_offsets)
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    backend.train_from_iterator([f"{SYSTEM} USER: What is it? ASSISTANT: A red circle.<|endoftext|>"] * 20, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    conversation = MULTI[:3] + [{"from": "gpt", "value": " Yes."}]  # an answer with its own leading space
    sample = tokenize_conversation(conversation, tokenizer, "phi3", has_image=True, max_length=512)
    labels = [label for label in sample.labels if label != IGNORE_INDEX]
    assert not sample.mismatch
    # " A" carries the separator; before " Yes" (the answer's own space) the separator is a lone " "
    assert tokenizer.decode(labels) == " A circle.<|endoftext|>  Yes.<|endoftext|>"


def test_phi3_multi_round_answers_starting_with_a_digit_and_a_word_without_a_space_piece(tokenizer):
    """Every answer is trained from its separator piece: "▁" + "5" (no "▁5" piece), "▁" + "R"
    (no "▁R"); "▁Yes" carries its own."""
    conversation = [
        {"from": "human", "value": "<image>\nHow many shapes are there?"}, {"from": "gpt", "value": "5."},
        {"from": "human", "value": "What color is it?"}, {"from": "gpt", "value": "Red."},
        {"from": "human", "value": "Is it large?"}, {"from": "gpt", "value": "Yes."},
    ]
    sample = tokenize_conversation(conversation, tokenizer, "phi3", has_image=True, max_length=512)
    assert not sample.mismatch
    labels = [sample.labels[p] for p in trained(sample)]
    assert tokenizer.convert_ids_to_tokens(labels) == [
        "▁", "5", ".", "<|endoftext|>", "▁", "R", "ed", ".", "<|endoftext|>", "▁Yes", ".", "<|endoftext|>"]
    runs = [p for p in trained(sample) if p - 1 not in trained(sample)]  # first position of each trained run
    assert tokenizer.convert_ids_to_tokens([sample.input_ids[p - 1] for p in runs]) == ["▁ASSISTANT:"] * 3

"""A tiny Phi-3-style tokenizer, trained locally in milliseconds on a built-in corpus.

Phi-3 uses Llama's SentencePiece layout, and so does this one: a BPE model with byte fallback
(`<0x00>`..`<0xFF>`, so any text encodes), `▁` for spaces attached to the following word
(prefixed to the first word of a text only), ids `<unk>`=0, `<s>`=1, `</s>`=2, then the bytes,
then the learned pieces, then Phi-3's chat tokens. As in Phi-3, `<|endoftext|>` is both eos and
pad. The corpus talks about coloured shapes in Bunny's `USER: ... ASSISTANT: ...` format, so
the prompts of the tests and of the tiny pipeline take few tokens. Training is deterministic:
the same corpus gives the same vocabulary, merges and ids on every run.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator, Sequence

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

UNK, BOS, LLAMA_EOS = "<unk>", "<s>", "</s>"
EOS = "<|endoftext|>"  # Phi-3's eos and pad
CHAT_TOKENS = ("<|assistant|>", "<|system|>", "<|end|>", "<|user|>")
BYTE_TOKENS = tuple(f"<0x{byte:02X}>" for byte in range(256))
LEARNED_VOCAB_SIZE = 320  # characters + merges; about 580 ids in all with bytes and specials
LLM_LEARNED_VOCAB_SIZE = 290  # the tiny LLM's: with WHOLE_WORDS, 595 ids in all
# The tiny data's answer words, one piece each in the tiny LLM's tokenizer (`save_tiny_llm`), as
# in a real LLM's vocabulary: learned from the corpus alone, "Red" comes out as "▁ R ed" and
# "Blue" / "Black" share two pieces, so every colour answer began with the same "▁" and greedy
# decoding had to get three tokens right to name a colour. The bare `build_tiny_tokenizer()`
# keeps the corpus-only pieces, whose awkward splits the masking tests rely on.
WHOLE_WORDS = (
    "Red", "Green", "Blue", "Yellow", "Purple", "Orange", "White", "Black", "Grey", "Small", "Large",
    "red", "green", "blue", "yellow", "orange", "grey", "large",
)
MODEL_MAX_LENGTH = 2048

PHI3_SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black", "pink", "grey", "gray", "brown")
SHAPES = ("circle", "square", "triangle", "star", "rectangle", "diamond")
SIZES = ("small", "large", "big", "tiny", "medium")
POSITIONS = ("at the top", "at the bottom", "on the left", "on the right", "in the middle",
             "in the top left corner", "in the bottom right corner", "in the center")
QUESTIONS = (
    "What shape is shown?", "What shape is in the picture?", "Name the shape in the image.",
    "What color is the shape?", "What colour is the shape?", "What color is the background?",
    "What is the background color?", "Is the shape small or large?", "Where is the shape?",
    "Describe the image briefly.", "What is in this image?", "How many shapes are there?",
    "Is there a circle in the image?", "Is there a square in the image?",
)
ANSWERS = (
    "The image shows a {size} {colour} {shape}.", "A {shape}.", "{Colour}.", "{Size}.", "Yes.", "No.",
    "The {shape} is {colour}.", "The background is {colour}.", "Yes, there is a {shape} in the image.",
    "No, the image shows a {shape}, not a circle.", "There is one {shape} {position}.",
)
WORDS = ("cat", "tree", "house", "river", "apple", "window", "garden", "pencil", "cloud", "bridge")
OPPOSITES = ("big", "small", "hot", "cold", "up", "down", "fast", "slow", "light", "dark", "open",
             "closed", "happy", "sad", "early", "late", "full", "empty", "hard", "soft")


def _builtin_corpus() -> Iterator[str]:
    """Sentences about coloured shapes, numbers and Bunny's chat format, in a fixed order."""
    yield PHI3_SYSTEM_PROMPT
    for colour, shape, size, position in itertools.product(COLOURS, SHAPES, SIZES, POSITIONS):
        yield f"a {size} {colour} {shape} {position} on a {COLOURS[len(shape) % len(COLOURS)]} background."
    for question, answer, colour, shape in itertools.product(QUESTIONS, ANSWERS, COLOURS[:8], SHAPES[:3]):
        size, position = SIZES[len(colour) % 2], POSITIONS[len(question) % len(POSITIONS)]
        reply = answer.format(size=size, Size=size.capitalize(), colour=colour, Colour=colour.capitalize(),
                              shape=shape, position=position)
        yield f"{PHI3_SYSTEM_PROMPT} USER: {question} ASSISTANT: {reply}{EOS}"
    for a, b in itertools.product(range(21), range(21)):
        yield f"What is {a} + {b}? {a} + {b} = {a + b}. {max(a, b)} minus {min(a, b)} is {abs(a - b)}."
    for word in WORDS:
        yield (f"How many letters are in the word \"{word}\"? The word \"{word}\" has {len(word)} letters. "
               f"Spell \"{word}\" backwards. \"{word}\" spelled backwards is \"{word[::-1]}\".")
    for word, opposite in zip(OPPOSITES[::2], OPPOSITES[1::2]):
        yield (f"What is the opposite of \"{word}\"? The opposite of \"{word}\" is \"{opposite}\". "
               f"{opposite.capitalize()}.")
    yield "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 100 1000"
    yield "Yes, no. Yes! No? (one, two; three: four) - 'five' / six & seven * eight # nine."


def _train_pieces(corpus: Iterable[str], vocab_size: int, whole_words: Sequence[str] = ()
                  ) -> tuple[list[str], list[tuple[str, str]]]:
    """Learn BPE pieces (in id order) and merges with the Metaspace pre-tokenizer."""
    scratch = Tokenizer(models.BPE(unk_token=UNK))
    scratch.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False)
    scratch.train_from_iterator(corpus, trainer=trainer)
    model = json.loads(scratch.to_str())["model"]
    pieces = [piece for piece, _ in sorted(model["vocab"].items(), key=lambda item: item[1])]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    _add_whole_words(scratch, whole_words, pieces, merges)
    return pieces, merges  # type: ignore[return-value]


def _add_whole_words(scratch: Tokenizer, whole_words: Sequence[str], pieces: list[str],
                     merges: list[tuple[str, str]]) -> None:
    """Append the merges that make each of `whole_words` (after a space) one piece: the word's
    pieces under the learned merges, joined left to right. Appended last, they apply only
    after every learned merge, so other words encode as before or with fewer pieces."""
    for word in whole_words:
        parts = scratch.encode(word).tokens  # "▁" + word: the Metaspace prefix of a first word
        joined = parts[0]
        for part in parts[1:]:
            if (joined, part) not in merges:
                merges.append((joined, part))
            joined += part
            if joined not in pieces:
                pieces.append(joined)


def build_tiny_tokenizer(
    add_bos: bool = True,
    corpus: Iterable[str] | None = None,
    model_max_length: int = MODEL_MAX_LENGTH,
    whole_words: Sequence[str] = (),
    learned_vocab_size: int = LEARNED_VOCAB_SIZE,
) -> PreTrainedTokenizerFast:
    """Train and wrap the tiny tokenizer.

    `add_bos=True` prepends `<s>` to every encoded text, like newer Phi-3 tokenizers; False
    encodes text alone. `corpus` is extra training text, added after the built-in corpus.
    `whole_words` (e.g. `WHOLE_WORDS`) become one piece each after a space; `learned_vocab_size`
    is how many characters and merges BPE learns from the corpus before them.
    The result round-trips through `save_pretrained` / `AutoTokenizer.from_pretrained`.
    """
    text = itertools.chain(_builtin_corpus(), corpus if corpus is not None else ())
    pieces, merges = _train_pieces(text, learned_vocab_size, whole_words)
    vocab: dict[str, int] = {}
    for token in (UNK, BOS, LLAMA_EOS, *BYTE_TOKENS, *pieces):
        vocab.setdefault(token, len(vocab))

    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=UNK, byte_fallback=True, fuse_unk=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in (UNK, BOS, LLAMA_EOS, EOS, *CHAT_TOKENS)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        add_bos_token=add_bos,
        add_eos_token=False,
        extra_special_tokens=list(CHAT_TOKENS),
        model_max_length=model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )

"""Conversation templates: prompt text, token ids and exact, self-checked label masks.

Records hold LLaVA-style turns: ``[{"from": "human", "value": q1}, {"from": "gpt", "value": a1}, ...]``,
alternating and starting with ``human``.

Templates (the strings of the original Bunny code):

* ``plain`` (pretraining): the human turn is replaced by the image placeholder alone and the
  text is ``<image>{caption}\\n`` (``{caption}\\n`` for a text-only record). Trained: the
  caption and its ``\\n``.
* chat templates, one per LLM family, differing only in the stop string that ends every answer:
  ``phi3`` (``<|endoftext|>``; the original's ``bunny``), ``llama3`` (``<|end_of_text|>``; the
  original's ``llama``), ``llama2`` (``</s>``), ``qwen2`` (``<|endoftext|>``):
  ``{system} USER: <image>\\n{q1} ASSISTANT: {a1}{stop}USER: {q2} ASSISTANT: {a2}{stop}``. In an
  image sample every ``<image>`` is removed from its turn, which then starts with ``<image>\\n``
  (the rest stripped). Trained: each answer and its stop string. ``check_template_fits`` refuses
  a stop string that is not one token and the tokenizer's EOS.

Token ids. The text is split at ``<image>``; each chunk is tokenized on its own and the chunks are
joined with one ``IMAGE_TOKEN_INDEX``. The special tokens the tokenizer puts before a text (a BOS
for newer Phi-3 tokenizers, nothing for others) are kept once, at the very start; tokens it would
append after a text (an EOS) are dropped, since each template ends its turns with its own string.

Label masking works on characters, never on re-tokenized rounds. The template marks which
characters of the text are trained; a fast tokenizer's offset mapping gives each token its
character span ``[start, end)``. A token is then:

* trained when its span holds trained non-whitespace characters and no untrained non-whitespace
  ones, whatever whitespace surrounds them: so ``▁Yes``, whose leading space is the untrained separator after
  ``ASSISTANT:``, is trained;
* untrained when its span holds untrained non-whitespace characters and no trained ones;
* for a whitespace-only or zero-width span (a lone ``▁``, a span offset trimming emptied):
  trained when the character right after it is trained (it leads into an answer: the lone
  ``▁`` a Llama-2-style vocabulary puts before a digit or a word without a ``▁`` piece, which
  generation must emit first after ``ASSISTANT:``, as the original trains it), or, at the end
  of the text, when it lies in trained text;
* a mismatch when its span holds non-whitespace characters of both kinds. No label can be right
  then, so the sample gets ``mismatch=True`` and every label ``IGNORE_INDEX``.

The masking then checks itself: each run of trained tokens, decoded, must be its answer and
stop string (leading whitespace aside; a run cut by truncation, a prefix of it). A tokenizer
whose offsets do not describe its text fails this and the sample is a mismatch too.

Prefix special tokens (BOS) and the image placeholder are never trained. Truncation keeps the
first ``max_length`` ids (only their labels are computed, so a straddling token past the cut does
not discard the sample); a cut that drops the image placeholder is an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from transformers import PreTrainedTokenizerBase

from bunny.constants import DEFAULT_IMAGE_TOKEN, IGNORE_INDEX, IMAGE_TOKEN_INDEX

HUMAN, GPT = "human", "gpt"
Turn = dict[str, str]


@dataclass(frozen=True)
class Template:
    """The strings one template puts around the turns of a conversation."""

    name: str
    style: Literal["plain", "chat"]
    system: str = ""
    user_role: str = ""
    assistant_role: str = ""
    answer_end: str = ""  # appended to every answer and trained with it


BUNNY_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


def _chat(name: str, stop: str) -> Template:
    """Bunny's chat layout (the original's ``SeparatorStyle.TWO``) ending each answer with `stop`."""
    return Template(name=name, style="chat", system=BUNNY_SYSTEM, user_role="USER",
                    assistant_role="ASSISTANT", answer_end=stop)


TEMPLATES: dict[str, Template] = {
    "plain": Template(name="plain", style="plain", answer_end="\n"),
    "phi3": _chat("phi3", "<|endoftext|>"),  # Phi-3's EOS; the original's "bunny" template
    "llama3": _chat("llama3", "<|end_of_text|>"),  # Llama-3's EOS; the original's "llama" template
    "llama2": _chat("llama2", "</s>"),  # Llama-2-style SentencePiece vocabularies
    "qwen2": _chat("qwen2", "<|endoftext|>"),  # Qwen2's EOS (the original trains Qwen with "bunny")
}
TEMPLATE_ALIASES = {"bunny": "phi3", "llama": "llama3"}  # the original Bunny's --version names
DEFAULT_TEMPLATES = {"phi-3": "phi3", "llama": "llama3", "qwen2": "qwen2"}  # --model_type -> finetune template


@dataclass(frozen=True)
class TokenizedSample:
    """Ids (with one `IMAGE_TOKEN_INDEX` per image) and labels of one training sample."""

    input_ids: list[int]
    labels: list[int]
    mismatch: bool


@dataclass(frozen=True)
class _Rendered:
    text: str
    trained_spans: tuple[tuple[int, int], ...]  # character ranges [start, end) that are trained


def get_template(name: str) -> Template:
    """The template called `name` (the value of `--version`; the original's names are aliases)."""
    template = TEMPLATES.get(TEMPLATE_ALIASES.get(name, name))
    if template is None:
        raise ValueError(f"--version {name!r} is not a known conversation template; known: "
                         f"{', '.join([*TEMPLATES, *TEMPLATE_ALIASES])}")
    return template


def default_template(model_type: str) -> str:
    """The finetune template of an LLM family (``--model_type``)."""
    if model_type not in DEFAULT_TEMPLATES:
        raise ValueError(f"no default conversation template for --model_type {model_type!r}; pass --version")
    return DEFAULT_TEMPLATES[model_type]


class TemplateMismatchError(ValueError):
    """A chat template whose stop string does not fit the tokenizer (a user error)."""


def check_template_fits(name: str, tokenizer: PreTrainedTokenizerBase, stop_ids: Sequence[int] = ()) -> None:
    """Refuse a chat template whose stop string the model could not learn to emit as its stop.

    The stop string ends every trained answer, so it must be a single token of `tokenizer`
    (else it is trained as ordinary text pieces and generation never stops), and that token
    must be the tokenizer's EOS or one of `stop_ids` (the model's generation config's EOS ids).
    """
    template = get_template(name)
    if template.style != "chat":
        return
    stop = template.answer_end
    ids = tokenizer(stop, add_special_tokens=False)["input_ids"]
    fitting = sorted(other.name for other in TEMPLATES.values()
                     if other.style == "chat" and other.answer_end == tokenizer.eos_token)
    hint = f"templates whose stop string is this tokenizer's EOS {tokenizer.eos_token!r}: {', '.join(fitting) or 'none'}"
    if len(ids) != 1:
        raise TemplateMismatchError(f"--version {name!r}: its stop string {stop!r} is not one token of this tokenizer "
                         f"(it encodes as {len(ids)} tokens {tokenizer.convert_ids_to_tokens(ids)}); {hint}")
    if ids[0] != tokenizer.eos_token_id and ids[0] not in set(stop_ids):
        raise TemplateMismatchError(f"--version {name!r}: its stop string {stop!r} is a token of this tokenizer but not "
                         f"its EOS nor an EOS id of the model's generation config, so generation would not stop "
                         f"there; {hint}")


def _check_turns(conversations: Sequence[Turn]) -> None:
    if not conversations:
        raise ValueError("a conversation needs at least one human and one gpt turn")
    for index, turn in enumerate(conversations):
        expected = HUMAN if index % 2 == 0 else GPT
        if not isinstance(turn, dict):
            raise ValueError(f"turn {index} is not an object with 'from' and 'value'")
        if turn.get("from") != expected:
            raise ValueError(f"turn {index} is from {turn.get('from')!r}, expected {expected!r} "
                             "(turns alternate human, gpt, starting with human)")
        if not isinstance(turn.get("value"), str):
            raise ValueError(f"turn {index} has no string 'value'")
    if len(conversations) % 2:
        raise ValueError("the last turn is from 'human'; a conversation ends with a gpt answer")


def _image_first(question: str) -> str:
    """Move the image placeholder to the start of its turn, as the original Bunny code does."""
    return (DEFAULT_IMAGE_TOKEN + "\n" + question.replace(DEFAULT_IMAGE_TOKEN, "").strip()).strip()


def _render(conversations: Sequence[Turn], template: Template, has_image: bool) -> _Rendered:
    _check_turns(conversations)
    placeholders = sum(turn["value"].count(DEFAULT_IMAGE_TOKEN) for turn in conversations)
    if not has_image and placeholders:
        raise ValueError(f"a text-only sample holds {placeholders} {DEFAULT_IMAGE_TOKEN}; it needs none")
    if template.style == "plain":
        if len(conversations) != 2:
            raise ValueError(f"the plain template takes one human and one gpt turn, got {len(conversations)} turns")
        text = DEFAULT_IMAGE_TOKEN if has_image else ""
        start = len(text)
        text += conversations[1]["value"] + template.answer_end
        return _Rendered(text, ((start, len(text)),))

    if has_image and placeholders != 1:
        raise ValueError(f"an image sample needs exactly one {DEFAULT_IMAGE_TOKEN} in its turns, got {placeholders}")
    text = template.system + " "
    spans: list[tuple[int, int]] = []
    for question, answer in zip(conversations[0::2], conversations[1::2]):
        value = question["value"]
        if has_image and DEFAULT_IMAGE_TOKEN in value:
            value = _image_first(value)
        text += f"{template.user_role}: {value} {template.assistant_role}: "
        start = len(text)
        text += answer["value"] + template.answer_end
        spans.append((start, len(text)))
    return _Rendered(text, tuple(spans))


def build_prompt(conversations: Sequence[Turn], template_name: str, has_image: bool | None = None) -> str:
    """The full training text of a conversation; `has_image=None` infers it from `<image>`."""
    if has_image is None:
        has_image = any(DEFAULT_IMAGE_TOKEN in turn.get("value", "") for turn in conversations)
    return _render(conversations, get_template(template_name), has_image).text


def generation_prompt(question: str, template_name: str, has_image: bool) -> str:
    """The prompt a model continues at inference: phi3's ends with `ASSISTANT:`, plain's is `<image>`.

    With `has_image` the question starts with `<image>\n` (an `<image>` already in it moves there).
    """
    template = get_template(template_name)
    if has_image:
        question = _image_first(question)
    elif DEFAULT_IMAGE_TOKEN in question:
        raise ValueError(f"a question without an image holds {DEFAULT_IMAGE_TOKEN}")
    if template.style == "plain":
        if not has_image:
            raise ValueError("the plain template captions an image; has_image must be True")
        return DEFAULT_IMAGE_TOKEN
    return f"{template.system} {template.user_role}: {question} {template.assistant_role}:"


@dataclass(frozen=True)
class _Encoded:
    ids: list[int]
    spans: list[tuple[int, int] | None]  # character span in the full text; None: BOS or image


def _encode(text: str, tokenizer: PreTrainedTokenizerBase, split_image: bool) -> _Encoded:
    """Ids of `text` with `<image>` spliced in as IMAGE_TOKEN_INDEX, and each token's char span."""
    if not tokenizer.is_fast:
        raise TypeError(f"{type(tokenizer).__name__} is not a fast tokenizer; label masking needs offset mappings")
    chunks = text.split(DEFAULT_IMAGE_TOKEN) if split_image else [text]
    ids: list[int] = []
    spans: list[tuple[int, int] | None] = []
    offset = 0
    for index, chunk in enumerate(chunks):
        if index:
            ids.append(IMAGE_TOKEN_INDEX)
            spans.append(None)
            offset += len(DEFAULT_IMAGE_TOKEN)
        encoding = tokenizer(chunk, add_special_tokens=index == 0, return_offsets_mapping=True,
                             return_special_tokens_mask=True)
        offsets = encoding["offset_mapping"]
        # added by the tokenizer, not read from the text: special and covering no character
        added = [bool(flag) and start == end for flag, (start, end) in zip(encoding["special_tokens_mask"], offsets)]
        first_text = added.index(False) if False in added else len(added)
        for i, (token_id, (start, end)) in enumerate(zip(encoding["input_ids"], offsets)):
            if added[i]:
                if i < first_text:  # a prefix such as BOS; trailing additions (EOS) are dropped
                    ids.append(token_id)
                    spans.append(None)
                continue
            ids.append(token_id)
            spans.append((offset + start, offset + end))
        offset += len(chunk)
    return _Encoded(ids, spans)


def tokenize_prompt(text: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids of an inference prompt, with each `<image>` as one IMAGE_TOKEN_INDEX."""
    return _encode(text, tokenizer, split_image=True).ids


_Side = Literal["trained", "untrained", "mismatch"]


def _token_side(text: str, trained: bytearray, start: int, end: int) -> _Side:
    """Which side of the trained/untrained boundary a token's character span lies on."""
    trained_text = untrained_text = False
    for position in range(start, end):
        if not text[position].isspace():
            trained_text |= bool(trained[position])
            untrained_text |= not trained[position]
    if trained_text and untrained_text:
        return "mismatch"
    if trained_text:
        return "trained"
    if untrained_text:
        return "untrained"
    # whitespace only, or zero-width: trained when it leads into trained text (the separator
    # piece before an answer, which generation must emit first) or lies wholly inside it
    if end < len(text):
        return "trained" if trained[end] else "untrained"
    return "trained" if all(trained[max(start, end - 1):end]) and end > 0 else "untrained"


def _labels(encoded: _Encoded, rendered: _Rendered) -> list[int] | None:
    """Labels for `encoded`, or None when a token straddles a boundary it cannot be assigned to."""
    trained = bytearray(len(rendered.text))
    for start, end in rendered.trained_spans:
        trained[start:end] = b"\x01" * (end - start)
    labels: list[int] = []
    for token_id, span in zip(encoded.ids, encoded.spans, strict=True):
        if span is None or not rendered.text:
            labels.append(IGNORE_INDEX)
            continue
        side = _token_side(rendered.text, trained, *span)
        if side == "mismatch":
            return None
        labels.append(token_id if side == "trained" else IGNORE_INDEX)
    return labels


def _decodes_to_answers(
    encoded: _Encoded, labels: list[int], rendered: _Rendered, tokenizer: PreTrainedTokenizerBase, truncated: bool
) -> bool:
    """Cross-check of the masking: each run of trained tokens, decoded, is its answer's text
    (with the stop string). Leading whitespace is not compared (the separator piece before an
    answer is trained; SentencePiece decoders drop a leading space); a run cut by truncation
    need only be a prefix of its answer."""
    runs: list[list[int]] = []
    previous = False
    for label in labels:
        is_trained = label != IGNORE_INDEX
        if is_trained:
            if not previous:
                runs.append([])
            runs[-1].append(label)
        previous = is_trained
    answers = [rendered.text[start:end] for start, end in rendered.trained_spans]
    if len(runs) > len(answers) or (len(runs) < len(answers) and not truncated):
        return False
    for index, (run, answer) in enumerate(zip(runs, answers)):
        decoded = tokenizer.decode(run, skip_special_tokens=False, clean_up_tokenization_spaces=False).lstrip()
        answer = answer.lstrip()
        if truncated and index == len(runs) - 1:
            if not answer.startswith(decoded.rstrip("\ufffd")):  # a cut may split a multi-byte character
                return False
        elif decoded != answer:
            return False
    return True


def tokenize_conversation(
    conversations: Sequence[Turn],
    tokenizer: PreTrainedTokenizerBase,
    template_name: str,
    has_image: bool,
    max_length: int,
) -> TokenizedSample:
    """Token ids and labels of one record (see the module docstring for the masking rule)."""
    if max_length < 1:
        raise ValueError(f"--model_max_length must be positive, got {max_length}")
    rendered = _render(conversations, get_template(template_name), has_image)
    full = _encode(rendered.text, tokenizer, split_image=has_image)
    kept = _Encoded(full.ids[:max_length], full.spans[:max_length])
    if has_image and IMAGE_TOKEN_INDEX not in kept.ids:
        raise ValueError(f"--model_max_length {max_length} cuts off the image placeholder "
                         f"(at token {full.ids.index(IMAGE_TOKEN_INDEX)})")
    labels = _labels(kept, rendered)
    if labels is None or not _decodes_to_answers(kept, labels, rendered, tokenizer, len(full.ids) > max_length):
        return TokenizedSample(input_ids=kept.ids, labels=[IGNORE_INDEX] * len(kept.ids), mismatch=True)
    return TokenizedSample(input_ids=kept.ids, labels=labels, mismatch=False)

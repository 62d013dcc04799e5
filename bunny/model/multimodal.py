"""The LLaVA-style parts shared by every LLM family: vision modules and image splicing.

``BunnyMetaModel`` adds ``vision_tower`` and ``mm_projector`` to a family's base model
(``Phi3Model``, ``LlamaModel``, ...). ``BunnyMetaForCausalLM`` replaces each
``IMAGE_TOKEN_INDEX`` in ``input_ids`` by the projected patch features of one image and
computes the loss on supervised positions only.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from bunny.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from bunny.model.projector import build_projector
from bunny.model.vision_tower import VisionTower, read_vision_config, upgrade_tower_key


DEFAULT_SELECT_LAYER = -2  # the original's SigLIP tower always uses the second-to-last layer


def saved_tower_config(config) -> dict | None:
    """The vision tower's config of a saved Bunny model (None for a plain LLM): embedded in
    this project's configs, else read from the folder the original's ``mm_vision_tower``
    names. Raises ``ValueError`` naming the field when that is not a local folder (the
    published Bunny models name a hub id): pass ``vision_tower=<folder>`` to
    ``from_pretrained`` (``--vision-tower`` on the command line)."""
    if getattr(config, "vision_tower_config", None):
        return dict(config.vision_tower_config)
    recorded = getattr(config, "mm_vision_tower", None)
    if not recorded:
        return None
    if not Path(recorded).is_dir():
        raise ValueError(
            f"the config's mm_vision_tower {recorded!r} is not a local folder and the config embeds no "
            "vision_tower_config: pass vision_tower=<the tower's folder> to from_pretrained "
            "(--vision-tower on the command line)"
        )
    return read_vision_config(recorded).to_dict()


class BunnyMetaModel:
    """Mixin for a family's base model. A saved Bunny model's config builds the vision
    modules here: this project's configs embed the tower's config (``vision_tower_config``);
    the original Bunny's name only the tower's folder (``mm_vision_tower``), whose
    ``config.json`` is read (weights come from the checkpoint either way). A plain LLM config
    gets them later from :meth:`initialize_vision_modules`."""

    def __init__(self, config):
        super().__init__(config)
        tower_config = saved_tower_config(config)
        if tower_config is not None:
            config.vision_tower_config = tower_config
            select_layer = getattr(config, "mm_vision_select_layer", None) or DEFAULT_SELECT_LAYER
            config.mm_vision_select_layer = select_layer
            self.vision_tower = VisionTower.from_config(tower_config, select_layer)
            self.mm_projector = build_projector(config.mm_projector_type, config.mm_hidden_size, config.hidden_size)

    def initialize_vision_modules(
        self,
        vision_tower_path: str | Path,
        projector_type: str,
        select_layer: int = -2,
        pretrain_mm_mlp_adapter: str | Path | None = None,
        **tower_kwargs,
    ) -> None:
        tower = VisionTower.from_pretrained(vision_tower_path, select_layer, **tower_kwargs)
        self.vision_tower = tower
        self.config.mm_vision_tower = str(vision_tower_path)
        self.config.vision_tower_config = tower.config.to_dict()
        self.config.mm_vision_select_layer = select_layer
        self.config.mm_hidden_size = tower.hidden_size
        self.config.mm_projector_type = projector_type
        self.mm_projector = build_projector(projector_type, tower.hidden_size, self.config.hidden_size)
        if pretrain_mm_mlp_adapter is not None:
            load_projector_weights(self.mm_projector, pretrain_mm_mlp_adapter)


def load_projector_weights(projector: nn.Module, path: str | Path) -> None:
    """Load a pretrain-stage ``mm_projector.bin`` (keys ``model.mm_projector.*`` or bare)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--pretrain_mm_mlp_adapter {path}: file not found")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    state = {key.split("mm_projector.", 1)[-1]: value for key, value in saved.items()}
    expected = projector.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"--pretrain_mm_mlp_adapter {path} does not fit --mm_projector_type: "
            f"missing keys {missing}, unexpected keys {unexpected}"
        )
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}" for k, v in expected.items() if state[k].shape != v.shape]
    if wrong:
        raise ValueError(f"--pretrain_mm_mlp_adapter {path}: shape mismatch ({'; '.join(wrong)})")
    projector.load_state_dict(state)


def splice_image_features(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor | None,
    image_features: torch.Tensor | None,
    embed_tokens: nn.Module,
    max_length: int | None = None,
    pad_left: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Expand each ``IMAGE_TOKEN_INDEX`` into its image's features, without a per-sample loop.

    Padding positions (``attention_mask == 0``) are dropped, each row is compacted and the
    batch re-padded to its new longest row (right, or left for generation). Image positions
    get ``IGNORE_INDEX`` labels: they are never trained. ``image_features[i]`` fills the
    i-th placeholder in row-major order. Rows longer than ``max_length`` are cut.
    Returns ``(inputs_embeds, attention_mask, labels)``.
    """
    batch, seq = input_ids.shape
    device = input_ids.device
    valid = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
    is_image = (input_ids == IMAGE_TOKEN_INDEX) & valid
    num_images = int(is_image.sum())
    num_available = 0 if image_features is None else image_features.shape[0]
    if num_images != num_available:
        raise ValueError(f"the batch has {num_images} image placeholders but {num_available} images")
    patches = 0 if image_features is None else image_features.shape[1]

    width = torch.where(is_image, patches, 1) * valid  # positions each input token occupies
    end = width.cumsum(1)
    start = end - width
    lengths = end[:, -1]
    out_len = int(lengths.max()) if batch else 0
    if max_length is not None:
        out_len = min(out_len, max_length)
    shift = (out_len - lengths.clamp(max=out_len)).unsqueeze(1) if pad_left else torch.zeros_like(lengths).unsqueeze(1)

    text_embeds = embed_tokens(input_ids.clamp(min=0))
    embeds = text_embeds.new_zeros(batch, out_len, text_embeds.shape[-1])
    new_labels = torch.full((batch, out_len), IGNORE_INDEX, dtype=torch.long, device=device) if labels is not None else None

    is_text = valid & ~is_image
    rows, cols = is_text.nonzero(as_tuple=True)
    target = (start + shift)[rows, cols]
    keep = target < out_len  # truncation
    rows, cols, target = rows[keep], cols[keep], target[keep]
    embeds[rows, target] = text_embeds[rows, cols]
    if new_labels is not None:
        new_labels[rows, target] = labels[rows, cols]

    if num_images:
        img_rows, img_cols = is_image.nonzero(as_tuple=True)  # row-major, matching image order
        offsets = torch.arange(patches, device=device)
        target = (start + shift)[img_rows, img_cols].unsqueeze(1) + offsets  # [num_images, patches]
        keep = target < out_len
        row_index = img_rows.unsqueeze(1).expand_as(target)
        embeds[row_index[keep], target[keep]] = image_features.to(embeds.dtype)[keep]

    positions = torch.arange(out_len, device=device).unsqueeze(0)
    new_mask = (positions >= shift) & (positions < shift + lengths.unsqueeze(1))
    return embeds, new_mask.long(), new_labels


def supervised_loss(
    hidden_states: torch.Tensor,
    labels: torch.Tensor,
    lm_head: nn.Module,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Next-token cross-entropy computed only where a label is trained.

    Projecting every position through the vocabulary (image patches and prompts included)
    costs a [tokens x vocab] matmul plus its float32 softmax; gathering the supervised
    positions first skips all of that for positions whose loss would be ignored anyway.
    ``num_items_in_batch`` (HF Trainer, across gradient accumulation) turns the mean into a
    sum over the accumulated batch's items.
    """
    target = labels[:, 1:]
    supervised = target != IGNORE_INDEX
    logits = lm_head(hidden_states[:, :-1][supervised]).float()
    loss = F.cross_entropy(logits, target[supervised], reduction="sum")
    if num_items_in_batch is None:
        return loss / supervised.sum().clamp(min=1)
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


class BunnyMetaForCausalLM:
    """Mixin for a family's ``*ForCausalLM``: multimodal forward and generate."""

    accepts_loss_kwargs = True  # HF Trainer passes num_items_in_batch to forward
    base_model_class: type  # the family's Bunny base model, set by each family

    def __init__(self, config, vision_tower: str | Path | None = None):
        """``vision_tower``: the tower's folder, for a config that names none that exists
        (``from_pretrained(path, vision_tower=...)``); it replaces ``mm_vision_tower``."""
        if vision_tower is not None:
            if not Path(vision_tower).is_dir():
                raise ValueError(f"vision_tower {vision_tower}: folder not found")
            config.mm_vision_tower = str(vision_tower)
            if not getattr(config, "vision_tower_config", None):
                config.vision_tower_config = read_vision_config(vision_tower).to_dict()
        # Skip the family's own __init__ (it would build a plain base model first, a second
        # full copy of the LLM) and build the same three attributes with our base model.
        family_causal_lm = type(self).__mro__[type(self).__mro__.index(BunnyMetaForCausalLM) + 1]
        super(family_causal_lm, self).__init__(config)
        self.model = self.base_model_class(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """transformers' ``from_pretrained``, refusing a folder written before this project
        adopted the original's tower layout: its tower would load as random weights."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        earlier = [key for key in info["unexpected_keys"] if upgrade_tower_key(key) != key]
        if earlier:
            raise ValueError(
                f"{args[0] if args else kwargs.get('pretrained_model_name_or_path')} names its vision tower's "
                f"tensors as this project's earlier versions did ({earlier[0]}, ...): upgrade it once with "
                "`python -m bunny.merge.upgrade OLD NEW`"
            )
        return (model, info) if want_info else model

    def get_model(self):
        return self.model

    def get_vision_tower(self) -> VisionTower | None:
        return getattr(self.model, "vision_tower", None)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.mm_projector(self.model.vision_tower(images))

    def prepare_multimodal_inputs(self, input_ids, attention_mask, labels, images, pad_left: bool = False):
        features = self.encode_images(images) if images is not None and len(images) else None
        embeds, attention_mask, labels = splice_image_features(
            input_ids,
            attention_mask,
            labels,
            features,
            self.get_input_embeddings(),
            max_length=getattr(self.config, "tokenizer_model_max_length", None),
            pad_left=pad_left,
        )
        if features is None and self.training and self._vision_is_trainable():
            embeds = embeds + 0.0 * self._blank_image_features().sum()
        return embeds, attention_mask, labels

    def _vision_is_trainable(self) -> bool:
        modules = (self.model.vision_tower, self.model.mm_projector)
        return any(param.requires_grad for module in modules for param in module.parameters())

    def _blank_image_features(self) -> torch.Tensor:
        """Features of one blank image. A text-only batch adds them times zero, so the
        trainable tower and projector still take part in the step: under ZeRO-3 (and DDP) a
        trainable parameter without a gradient breaks the gradient reduction."""
        size = self.model.vision_tower.config.image_size
        blank = torch.zeros(1, 3, size, size, device=self.device)
        return self.encode_images(blank)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        images: torch.Tensor | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        multimodal = images is not None or bool((input_ids < 0).any()) if input_ids is not None else False
        if inputs_embeds is None and input_ids is not None and (multimodal or (self.training and self._vision_is_trainable())):
            inputs_embeds, attention_mask, labels = self.prepare_multimodal_inputs(input_ids, attention_mask, labels, images)
            input_ids, position_ids = None, None
        if not (self.training and labels is not None):
            # Evaluation and generation: the family's own forward (full logits, HF loss).
            return super().forward(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                labels=labels,
                **kwargs,
            )
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=False,
        )
        loss = supervised_loss(outputs.last_hidden_state, labels, self.lm_head, num_items_in_batch)
        return CausalLMOutputWithPast(loss=loss)

    @torch.no_grad()
    def generate(self, inputs: torch.Tensor | None = None, images: torch.Tensor | None = None, **kwargs):
        if inputs is not None and (images is not None or (inputs < 0).any()):
            embeds, attention_mask, _ = self.prepare_multimodal_inputs(
                inputs, kwargs.pop("attention_mask", None), None, images, pad_left=True
            )
            return super().generate(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)
        return super().generate(inputs, **kwargs)

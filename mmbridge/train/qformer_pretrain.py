"""BLIP-2 stage 1: vision-language representation learning for a Q-Former, with no LLM.

Three objectives share the Q-Former (arXiv 2301.12597, section 3.2), each with its own
self-attention mask over ``[queries; text]``:

* **ITC** (image-text contrastive) — unimodal: the queries see only queries (image side),
  the text only text (its ``[CLS]`` is the text feature). Similarity of an image and a text
  is the maximum over the queries of ``query_feature · text_feature``; a symmetric softmax
  cross-entropy over the batch (label smoothing 0.1, learned temperature) pulls matching
  pairs together. Pairs whose captions are identical count as positives.
* **ITM** (image-text matching) — bidirectional: queries and text see each other; a linear
  head on every query output, averaged, classifies match / no match. Hard negatives are
  mined from the ITC similarities: for every text an image and for every image a text,
  drawn with probability ``softmax(similarity)`` among the non-matching ones (or the most
  similar one with ``greedy``).
* **ITG** (image-grounded text generation) — multimodal causal: queries see only queries,
  each text token sees every query and the text tokens up to itself; the first text token
  is the decoder token (LAVIS' ``[DEC]``; here BERT's reserved ``[unused0]``, so the
  vocabulary does not grow) and a BERT LM head tied to the word embeddings predicts the
  caption.

Training: a recipe whose stages say ``objective: itc_itm_itg`` runs in the main trainer
(:func:`mmbridge.train.train`, ``mmbridge train``; ``mmbridge pretrain-qformer`` sets the objective on
recipes that name none), with its multi-process training (DDP), loader workers, feature cache, Ctrl-C and
exact resume. ``model`` names ``vision`` and a ``qformer``-family ``bridge``; ``model.llm`` is stage 2's LLM
and is not built: the trainer holds a :class:`QFormerPretrainModel` under the usual keys (``vision``,
``bridge``, an empty ``llm``), so each stage's ``train`` freezes/unfreezes them through
:func:`~mmbridge.train.recipe.apply_stage`. ``output_dir/final`` is a Q-Former directory that a stage-2
bridge loads with ``init_from``::

    mmbridge train configs/blip2_stage1.yaml [key.path=value ...] [--resume]

Data: the sources of a stage's ``data`` (LLaVA-format files, webdataset shards or MiniWorld tasks);
every sample has one image and its first assistant reply is the caption (:class:`CaptionProcessor`;
``data.max_length`` caps the caption's tokens, default 32). Batches are uniform draws of at least 2 samples
(never grouped by length: ITC and ITM take their negatives from the batch). ITC's negatives are the other samples of a
process's micro-batch (no gathering across processes), so N processes train like one with N times the
``grad_accum``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from transformers.activations import ACT2FN

from mmbridge.boxes import check_box_format, rewrite_boxes
from mmbridge.config import RunConfig
from mmbridge.data import ImageLoadError, SampleError
from mmbridge.data.collate import IGNORE_INDEX
from mmbridge.data.formats.llava import Sample
from mmbridge.model.bridges import BRIDGES
from mmbridge.model.bridges.base import StageHooks
from mmbridge.model.bridges.qformer import (QFormer, QFormerBridgeConfig, build_qformer, load_text_tokenizer,
                                            resolve_config, save_qformer)
from mmbridge.model.multimodal import parameter_counts
from mmbridge.model.vision import build_vision
from mmbridge.train.recipe import STAGE1_OBJECTIVE
from mmbridge.utils import atomic_path

EMBED_DIM = 256  # ITC feature width (BLIP-2's embed_dim)
CAPTION_MAX_LENGTH = 32  # caption tokens (BLIP-2's max_txt_len)
LABEL_SMOOTHING = 0.1
DECODER_TOKEN = "[unused0]"  # stands for LAVIS' [DEC] bos token
HEADS_FILE = "heads.safetensors"


# -- attention masks (keep-masks: True where a position may attend) ---------------------------
def itm_attention_mask(query_count: int, text_mask: torch.Tensor) -> torch.Tensor:
    """Bidirectional ``[B, Q+T]``: every position sees every query and every real text token."""
    queries = torch.ones(text_mask.shape[0], query_count, dtype=torch.bool, device=text_mask.device)
    return torch.cat([queries, text_mask.bool()], dim=1)


def itg_attention_mask(query_count: int, text_mask: torch.Tensor) -> torch.Tensor:
    """Multimodal causal ``[B, Q+T, Q+T]``: queries see queries; text ``t`` sees all queries and real text ``<= t``."""
    batch, length = text_mask.shape
    total = query_count + length
    mask = torch.zeros(batch, total, total, dtype=torch.bool, device=text_mask.device)
    mask[:, :, :query_count] = True
    causal = torch.ones(length, length, dtype=torch.bool, device=text_mask.device).tril()  # [T, T]
    mask[:, query_count:, query_count:] = causal & text_mask.bool()[:, None, :]
    return mask


# -- losses ------------------------------------------------------------------------------------
def itc_similarities(image_feats: torch.Tensor, text_feats: torch.Tensor,
                     temperature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Image→text and text→image similarities ``[B, B]``: max over queries of query · text features, / temperature."""
    per_query = torch.einsum("iqe,te->itq", image_feats, text_feats)  # [B_img, B_txt, Q]
    image_to_text = per_query.max(dim=-1).values / temperature  # [B, B]
    return image_to_text, image_to_text.t()


def itc_loss(image_to_text: torch.Tensor, text_to_image: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Symmetric contrastive loss; ``positives`` ``[B, B]`` spreads each row's target over its matches."""
    targets = positives.float() / positives.float().sum(dim=1, keepdim=True)  # [B, B]
    image_side = nn.functional.cross_entropy(image_to_text, targets, label_smoothing=LABEL_SMOOTHING)
    text_side = nn.functional.cross_entropy(text_to_image, targets.t(), label_smoothing=LABEL_SMOOTHING)
    return (image_side + text_side) / 2


def mine_hard_negatives(similarity: torch.Tensor, positives: torch.Tensor, generator: torch.Generator | None = None,
                        greedy: bool = False) -> torch.Tensor:
    """For each row of ``similarity`` ``[B, B]``, a column that is not a positive: drawn ∝ softmax, or the argmax.

    A row whose every column is a positive (identical captions batch-wide) falls back to any
    other column. Returns ``[B]`` indices.
    """
    if similarity.shape[0] < 2:
        raise ValueError("ITM hard negatives need a batch of at least 2 image-text pairs")
    excluded = positives.clone()
    lonely = excluded.all(dim=1)
    excluded[lonely] = torch.eye(similarity.shape[0], dtype=torch.bool, device=similarity.device)[lonely]
    weights = similarity.detach().float().softmax(dim=1).masked_fill(excluded, 0.0)  # [B, B]
    if greedy:
        return weights.masked_fill(excluded, -1.0).argmax(dim=1)
    weights = weights + (~excluded).float() * 1e-4  # every non-positive stays reachable, as in LAVIS
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


def same_caption(text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
    """``[B, B]`` True where two captions have identical tokens (they are both positives of either image)."""
    ids = text_ids.masked_fill(~text_mask.bool(), -1)
    return (ids[:, None, :] == ids[None, :, :]).all(dim=-1)


# -- the stage-1 bridge ------------------------------------------------------------------------
class QFormerPretrainHeads(StageHooks, nn.Module):
    """The Q-Former (with text input) plus the stage-1 heads: ITC projections, ITM head, LM head, temperature."""

    def __init__(self, qformer: QFormer, hidden_size: int, vocab_size: int, activation: str, eps: float,
                 decoder_token_id: int) -> None:
        super().__init__()
        self.qformer = qformer
        self.vision_proj = nn.Linear(hidden_size, EMBED_DIM)
        self.text_proj = nn.Linear(hidden_size, EMBED_DIM)
        self.itm_head = nn.Linear(hidden_size, 2)
        self.lm_transform = nn.Sequential(nn.Linear(hidden_size, hidden_size), ACT2FN[activation],
                                          nn.LayerNorm(hidden_size, eps=eps))
        self.lm_bias = nn.Parameter(torch.zeros(vocab_size))
        self.temperature = nn.Parameter(torch.tensor(0.07))
        self.decoder_token_id = decoder_token_id

    def itc_features(self, image: torch.Tensor, text_ids: torch.Tensor,
                     text_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised query features ``[B, Q, E]`` (queries alone) and ``[CLS]`` features ``[B, E]`` (text alone)."""
        queries = self.qformer(image)  # [B, Q, H]
        text = self.qformer(text_ids=text_ids, text_mask=text_mask, use_queries=False)  # [B, T, H]
        image_feats = nn.functional.normalize(self.vision_proj(queries), dim=-1)
        text_feats = nn.functional.normalize(self.text_proj(text[:, 0]), dim=-1)
        return image_feats, text_feats

    def itm_logits(self, image: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Match/no-match logits ``[B, 2]``: the ITM head on each query output, averaged over queries."""
        count = self.qformer.num_queries
        hidden = self.qformer(image, text_ids, attention_mask=itm_attention_mask(count, text_mask))
        return self.itm_head(hidden[:, :count]).mean(dim=1)

    def itg_loss(self, image: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Caption cross-entropy under the multimodal causal mask; the first token is the decoder token."""
        count = self.qformer.num_queries
        decoder_ids = text_ids.clone()
        decoder_ids[:, 0] = self.decoder_token_id
        hidden = self.qformer(image, decoder_ids, attention_mask=itg_attention_mask(count, text_mask))
        text_hidden = self.lm_transform(hidden[:, count:-1])  # [B, T-1, H]: position t predicts token t+1
        logits = nn.functional.linear(text_hidden, self.qformer.embeddings.word_embeddings.weight, self.lm_bias)
        labels = decoder_ids[:, 1:].masked_fill(~text_mask[:, 1:].bool(), IGNORE_INDEX)  # [B, T-1]
        return nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(),
                                           ignore_index=IGNORE_INDEX, label_smoothing=LABEL_SMOOTHING)


@dataclass
class PretrainOutput:
    """The summed loss and its three parts."""

    loss: torch.Tensor
    itc: torch.Tensor
    itm: torch.Tensor
    itg: torch.Tensor


class QFormerPretrainModel(nn.Module):
    """Stage 1 under the usual module keys: ``vision``, ``bridge`` (Q-Former + heads), ``llm`` and ``output``
    (empty)."""

    def __init__(self, vision: nn.Module, bridge: QFormerPretrainHeads, config: QFormerBridgeConfig,
                 tokenizer: Any) -> None:
        super().__init__()
        self.vision = vision
        self.bridge = bridge
        self.llm = nn.Module()  # stage 1 has no LLM; the key exists so stages speak the usual keys
        self.output = nn.Module()  # nor an output side
        self.bridge_config = config
        self.tokenizer = tokenizer
        self.processor_settings: dict = {}  # the trainer records a stage's box_format here; final/ saves none

    def parameter_counts(self) -> dict[str, dict[str, int]]:
        """``{key: {"trainable": n, "frozen": n}}`` for every module key."""
        return parameter_counts(self)

    def add_lora(self, key: str, spec: Any) -> None:
        raise ValueError("Q-Former stage 1 supports the tuning modes frozen, full and partial, not lora")

    def processor(self, max_length: int = CAPTION_MAX_LENGTH, box_format: str = "plain") -> "CaptionProcessor":
        """The stage's examples: image-caption pairs in the Q-Former's tokenizer (the trainer asks for it as it
        asks :meth:`MultimodalModel.processor`)."""
        return CaptionProcessor(self.tokenizer, self.vision.transform, max_length, box_format)

    def save_pretrained(self, directory: str) -> None:
        """``output_dir/final``: a directory a stage-2 Q-Former bridge reads with ``init_from``."""
        save_pretrained_qformer(self, directory)

    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W] -> [B, N, D_v]
        """Encoder features, without autograd when the encoder is frozen."""
        trains = any(parameter.requires_grad for parameter in self.vision.parameters())
        with torch.set_grad_enabled(trains and torch.is_grad_enabled()):
            return self.vision(pixel_values)

    def forward(self, pixel_values: torch.Tensor | None, text_ids: torch.Tensor, text_mask: torch.Tensor,
                generator: torch.Generator | None = None, greedy_negatives: bool = False,
                image_features: torch.Tensor | None = None) -> PretrainOutput:
        """ITC + ITM + ITG on a batch of image-caption pairs (``[B, 3, H, W]``, ``[B, T]``, ``[B, T]``); cached
        encoder outputs ``image_features`` ``[B, N, D_v]`` (a feature cache) stand in for the pixels."""
        image = self.vision_features(pixel_values) if image_features is None else image_features  # [B, N, D_v]
        heads = self.bridge
        image_feats, text_feats = heads.itc_features(image, text_ids, text_mask)
        temperature = heads.temperature.clamp(0.001, 0.5)
        image_to_text, text_to_image = itc_similarities(image_feats, text_feats, temperature)
        positives = same_caption(text_ids, text_mask)
        itc = itc_loss(image_to_text, text_to_image, positives)
        itm = self._itm_loss(image, text_ids, text_mask, image_to_text, positives, generator, greedy_negatives)
        itg = heads.itg_loss(image, text_ids, text_mask)
        return PretrainOutput(loss=itc + itm + itg, itc=itc, itm=itm, itg=itg)

    def _itm_loss(self, image: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor,
                  image_to_text: torch.Tensor, positives: torch.Tensor, generator: torch.Generator | None,
                  greedy: bool) -> torch.Tensor:
        """Positives, (hard negative image, text) and (image, hard negative text) pairs, LAVIS' order."""
        negative_texts = mine_hard_negatives(image_to_text, positives, generator, greedy)  # [B] per image
        negative_images = mine_hard_negatives(image_to_text.t(), positives, generator, greedy)  # [B] per text
        images = torch.cat([image, image[negative_images], image])  # [3B, N, D_v]
        ids = torch.cat([text_ids, text_ids, text_ids[negative_texts]])  # [3B, T]
        masks = torch.cat([text_mask, text_mask, text_mask[negative_texts]])
        batch = text_ids.shape[0]
        labels = torch.cat([torch.ones(batch), torch.zeros(2 * batch)]).long().to(text_ids.device)
        return nn.functional.cross_entropy(self.bridge.itm_logits(images, ids, masks).float(), labels)


def build_pretrain_model(model_spec: dict) -> QFormerPretrainModel:
    """The stage-1 model of a recipe's ``model`` section (its ``llm`` is not built)."""
    config = BRIDGES.make_config(model_spec["bridge"])
    if not isinstance(config, QFormerBridgeConfig):
        raise ValueError(f"Q-Former pretraining needs a qformer-family bridge (qformer, instruct_qformer, llama_vid), "
                         f"got {config.type!r}")
    config = resolve_config(config)
    tokenizer = load_text_tokenizer(config)
    if tokenizer is None:
        raise ValueError("Q-Former pretraining needs a text tokenizer: set the bridge's init_from or tokenizer")
    vision = build_vision(model_spec["vision"])
    qformer = build_qformer(config, vision.feature_dim, text_input=True)
    decoder_id = tokenizer.convert_tokens_to_ids(DECODER_TOKEN)
    if decoder_id is None or decoder_id == tokenizer.unk_token_id:
        decoder_id = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    heads = QFormerPretrainHeads(qformer, config.hidden_size, config.vocab_size, config.hidden_act,
                                 config.layer_norm_eps, int(decoder_id))
    return QFormerPretrainModel(vision, heads, config, tokenizer)


def save_pretrained_qformer(model: QFormerPretrainModel, directory: str) -> None:
    """Write ``directory`` for ``init_from``: Q-Former weights, architecture, tokenizer, and the stage-1 heads."""
    save_qformer(model.bridge.qformer, model.bridge_config, directory, model.tokenizer)
    heads = {name: tensor.contiguous() for name, tensor in model.bridge.state_dict().items()
             if not name.startswith("qformer.")}
    with atomic_path(os.path.join(directory, HEADS_FILE)) as temporary:
        save_file(heads, temporary)


# -- data --------------------------------------------------------------------------------------
class CaptionProcessor:
    """A sample → a stage-1 example: its one image and its caption (the first assistant reply) in the Q-Former's
    tokenizer, ``{"id", "input_ids": [T], "pixel_values": [1, 3, H, W]}`` (``[CLS] … [SEP]``, at most
    ``max_length`` tokens). :func:`~mmbridge.data.collate` pads the captions into ``input_ids``/``attention_mask``
    ``[B, T]`` as the tokenizer pads a batch.

    It speaks the part of :class:`~mmbridge.data.processor.Processor` that the data pipeline reads
    (:class:`~mmbridge.data.mixture.MixtureDataset`, the feature cache, loader workers): a call with
    ``pixels=False`` leaves the image out, :meth:`load_images`, :meth:`pixel_values`, :attr:`pad_token_id`,
    :attr:`transform`, and no high-resolution strategy or video media. A sample without exactly one image or
    without a reply is a :class:`~mmbridge.data.processor.SampleError` (skipped with ``skip_bad_samples``).
    """

    highres = None  # what the feature cache asks a processor
    video_as_media = False

    def __init__(self, tokenizer: Any, transform: Any, max_length: int = CAPTION_MAX_LENGTH,
                 box_format: str = "plain") -> None:
        if max_length < 2:
            raise ValueError(f"caption max_length must be at least 2 ([CLS] and a token), got {max_length}")
        self.tokenizer, self.transform, self.max_length = tokenizer, transform, int(max_length)
        self.box_format = check_box_format(box_format)

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def __call__(self, sample: Sample, images: list[Image.Image] | None = None, pixels: bool = True) -> dict:
        """The example of ``sample``; ``images`` (PIL) replace loading its image."""
        caption = rewrite_boxes(self.caption(sample), self.box_format)
        ids = self.tokenizer(caption, truncation=True, max_length=self.max_length)["input_ids"]
        example = {"id": sample.id, "input_ids": torch.tensor(ids, dtype=torch.long)}
        if pixels:
            example["pixel_values"] = self.pixel_values(images if images is not None else self.load_images(sample))
        return example

    def caption(self, sample: Sample) -> str:
        """The text of ``sample``'s example: its caption (:func:`caption_of`)."""
        return caption_of(sample)

    def load_images(self, sample: Sample) -> list[Image.Image]:
        """The sample's image, decoded (streamed samples: from their ``image_loader``)."""
        if sample.image_loader is not None:
            return list(sample.image_loader())
        return [_open_image(path, sample.id) for path in sample.images]

    def pixel_values(self, images: list[Image.Image]) -> torch.Tensor:
        """``[n, 3, H, W]``: the encoder's transform of each image."""
        return self.transform.batch(images)


def caption_of(sample: Sample) -> str:
    """The caption of a stage-1 sample: its first assistant reply; a :class:`SampleError` unless the sample has
    exactly one image and a reply."""
    if len(sample.images) != 1:
        raise SampleError(f"sample {sample.id!r}: Q-Former stage 1 needs one image per sample, it has "
                          f"{len(sample.images)}", sample.id, "image_count")
    reply = next((turn["content"] for turn in sample.conversation if turn["role"] == "assistant"), None)
    if reply is None:
        raise SampleError(f"sample {sample.id!r} has no assistant reply to take as its caption", sample.id,
                          "no_caption")
    return reply


def check_captions(samples: list[Sample], where: str, objective: str = STAGE1_OBJECTIVE,
                   caption: Callable[[Sample], str] = caption_of) -> None:
    """Every sample is an image-caption pair (``caption`` of it raises no :class:`SampleError`); else one
    ``ValueError`` naming the first five that are not (a stage without ``skip_bad_samples`` learns it before
    training rather than at the batch that holds one)."""
    bad = []
    for sample in samples:
        try:
            caption(sample)
        except SampleError as error:
            bad.append(f"{sample.id} ({error.reason})")
    if bad:
        raise ValueError(f"{where}: objective '{objective}' trains on samples with one image and a caption; "
                         f"{len(bad)} sample(s) are not: {', '.join(bad[:5])} (or set data.skip_bad_samples)")


def _open_image(path: str, sample_id: str) -> Image.Image:
    """Open and decode one image file, as RGB; an :class:`ImageLoadError` naming the file and the sample."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        cause = "file not found" if isinstance(error, FileNotFoundError) else f"{type(error).__name__}: {error}"
        raise ImageLoadError(path, sample_id, cause) from error


def stage1_recipe(run: RunConfig) -> RunConfig:
    """``run`` with ``objective: itc_itm_itg`` on every stage that names none (``mmbridge pretrain-qformer``'s
    recipes); a stage that names another objective is refused."""
    for index, stage in enumerate(run.stages):
        if not isinstance(stage, dict):
            continue  # preflight names the problem
        objective = stage.setdefault("objective", STAGE1_OBJECTIVE)
        if objective != STAGE1_OBJECTIVE:
            raise ValueError(f"stages.{index} ('{stage.get('name', 'stage')}') has objective {objective!r}: "
                             f"pretrain-qformer trains '{STAGE1_OBJECTIVE}' (or remove the field); other "
                             f"objectives train with mmbridge train")
    return run

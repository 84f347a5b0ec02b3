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

Entry points: :func:`pretrain` runs a recipe (:class:`~mmbridge.config.RunConfig`: ``model``
names ``vision`` and a ``qformer``-family ``bridge``; ``model.llm`` is stage 2's LLM and is
not built here; each stage's ``train`` freezes/unfreezes ``vision``/``bridge`` through
:func:`~mmbridge.train.recipe.apply_stage`) and writes ``output_dir/final``, a directory that
a stage-2 bridge loads with ``init_from``. On the command line::

    mmbridge pretrain-qformer configs/blip2_stage1.yaml [key.path=value ...]

Data: the sources of a recipe's ``data`` (LLaVA-format JSON files or streamed MiniWorld tasks);
every sample has one image and its first assistant reply is the caption. Single process; ITC
negatives are the other samples of the batch (no cross-device gathering). Checkpoints and
``resume`` work as in the main trainer (``mmbridge pretrain-qformer RECIPE --resume``).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm
from transformers.activations import ACT2FN

from mmbridge.config import RunConfig, save_run_config
from mmbridge.data.formats.llava import Sample
from mmbridge.data.mixture import DataConfig, load_source, _source_names
from mmbridge.model.bridges import BRIDGES
from mmbridge.model.bridges.qformer import (QFormer, QFormerBridgeConfig, build_qformer, load_text_tokenizer,
                                            resolve_config, save_qformer)
from mmbridge.data.collate import IGNORE_INDEX
from mmbridge.model.multimodal import MODULE_KEYS
from mmbridge.model.vision import build_vision
from mmbridge.train import checkpoint as ckpt
from mmbridge.train.distributed import launched_processes
from mmbridge.train.interrupt import StopOnInterrupt, TrainingInterrupted
from mmbridge.train.preflight import check_run, stage_data
from mmbridge.train.recipe import StageConfig, apply_stage, autocast, format_table, lr_lambda, optimizer_groups
from mmbridge.utils import atomic_path, seed_everything

logger = logging.getLogger("mmbridge")
EMBED_DIM = 256  # ITC feature width (BLIP-2's embed_dim)
CAPTION_MAX_LENGTH = 32  # caption tokens (BLIP-2's max_txt_len)
LABEL_SMOOTHING = 0.1
DECODER_TOKEN = "[unused0]"  # stands for LAVIS' [DEC] bos token
HEADS_FILE = "heads.safetensors"
StepCallback = Callable[[dict], None]


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
class QFormerPretrainHeads(nn.Module):
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
    """Stage 1 under the usual module keys: ``vision``, ``bridge`` (Q-Former + heads), ``llm`` (empty)."""

    def __init__(self, vision: nn.Module, bridge: QFormerPretrainHeads, config: QFormerBridgeConfig,
                 tokenizer: Any) -> None:
        super().__init__()
        self.vision = vision
        self.bridge = bridge
        self.llm = nn.Module()  # stage 1 has no LLM; the key exists so stages speak the usual keys
        self.bridge_config = config
        self.tokenizer = tokenizer

    def parameter_counts(self) -> dict[str, dict[str, int]]:
        """``{key: {"trainable": n, "frozen": n}}`` for ``vision``, ``bridge``, ``llm``."""
        counts = {key: {"trainable": 0, "frozen": 0} for key in MODULE_KEYS}
        for name, parameter in self.named_parameters():
            counts[name.split(".", 1)[0]]["trainable" if parameter.requires_grad else "frozen"] += parameter.numel()
        return counts

    def add_lora(self, key: str, spec: Any) -> None:
        raise ValueError("Q-Former stage 1 supports the tuning modes frozen, full and partial, not lora")

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W] -> [B, N, D_v]
        """Encoder features, without autograd when the encoder is frozen."""
        trains = any(parameter.requires_grad for parameter in self.vision.parameters())
        with torch.set_grad_enabled(trains and torch.is_grad_enabled()):
            return self.vision(pixel_values)

    def forward(self, pixel_values: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor,
                generator: torch.Generator | None = None, greedy_negatives: bool = False) -> PretrainOutput:
        """ITC + ITM + ITG on a batch of image-caption pairs (``[B, 3, H, W]``, ``[B, T]``, ``[B, T]``)."""
        image = self.image_features(pixel_values)  # [B, N, D_v]
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
class CaptionBatches:
    """Image-caption pairs from LLaVA files; batch ``m`` of a stage is a pure function of (seed, m)."""

    def __init__(self, data: DataConfig, model: QFormerPretrainModel, batch_size: int, seed: int) -> None:
        self.samples: list[Sample] = []
        for source, name in zip(data.sources, _source_names(data.sources)):
            self.samples += load_source(source, name)
        bad = [sample.id for sample in self.samples if len(sample.images) != 1]
        if bad:
            raise ValueError(f"Q-Former pretraining needs one image per sample; samples {bad[:5]} have another count")
        self.model, self.batch_size, self.seed = model, batch_size, seed
        self.batches_per_epoch = max(1, len(self.samples) // batch_size)

    def __call__(self, index: int) -> dict[str, torch.Tensor]:
        """Micro-batch ``index``: ``pixel_values``, ``text_ids``, ``text_mask``."""
        epoch, position = divmod(index, self.batches_per_epoch)
        order = torch.randperm(len(self.samples), generator=torch.Generator().manual_seed(self.seed + epoch))
        chosen = [self.samples[i] for i in order[position * self.batch_size:(position + 1) * self.batch_size]]
        captions = [next(turn["content"] for turn in sample.conversation if turn["role"] == "assistant")
                    for sample in chosen]
        encoded = self.model.tokenizer(captions, padding=True, truncation=True, max_length=CAPTION_MAX_LENGTH,
                                       return_tensors="pt")
        images = [sample.image_loader()[0] if sample.image_loader is not None else _load_rgb(sample.images[0])
                  for sample in chosen]
        return {"pixel_values": self.model.vision.transform.batch(images), "text_ids": encoded["input_ids"],
                "text_mask": encoded["attention_mask"]}


def _load_rgb(path: str) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


# -- the loop ----------------------------------------------------------------------------------
@dataclass
class PretrainResult:
    """The stage-1 model and its per-step log (loss and the three parts)."""

    model: QFormerPretrainModel
    history: list[dict] = field(default_factory=list)
    output_dir: str = ""


def pretrain(run: RunConfig, progress: bool = True, on_step: StepCallback | None = None,
             model: QFormerPretrainModel | None = None, resume: bool = False) -> PretrainResult:
    """Run every stage of a stage-1 recipe and save ``output_dir/final`` (see the module docstring).

    Checkpoints (``output_dir/checkpoints``, the trainer's format) are written every
    ``save_every`` steps and at the end of each stage; with ``resume`` the run continues from the
    newest one with the same losses and weights as an uninterrupted run.
    """
    if launched_processes() > 1:
        raise ValueError("pretrain-qformer trains on one process; launch it without accelerate launch/torchrun")
    stages = check_run(run, components=("vision", "bridge"))  # stage 1 has no LLM
    saved_path = ckpt.latest_checkpoint(os.path.join(run.output_dir, "checkpoints")) if resume else None
    if saved_path:
        ckpt.check_recipe_unchanged(os.path.join(run.output_dir, "recipe.yaml"), run.to_dict(), saved_path)
    saved = ckpt.read_state(saved_path) if saved_path else None
    if resume and saved is None:
        logger.warning("--resume: no checkpoint in %s/checkpoints; starting from scratch", run.output_dir)
    seed_everything(run.seed)
    model = model or build_pretrain_model(run.model)
    os.makedirs(run.output_dir, exist_ok=True)
    save_run_config(run, os.path.join(run.output_dir, "recipe.yaml"))
    state = ckpt.saved_state(saved) if saved else ckpt.TrainState()
    result = PretrainResult(model, list(state.history), output_dir=run.output_dir)
    touched: set[str] = set()
    for index, stage in enumerate(stages):
        rows = apply_stage(model, stage, log=False)
        touched |= {name for name, parameter in model.named_parameters() if parameter.requires_grad}
        if index < state.stage_index:
            continue
        logger.info("stage %d/%d '%s'\n%s", index + 1, len(run.stages), stage.name, format_table(rows))
        resuming = saved if saved is not None and index == saved["stage_index"] else None
        _run_stage(run, index, stage, model, progress, on_step, result, state, touched, resuming, saved_path)
        state.stage_index, state.step = index + 1, 0
    if saved is not None and saved["stage_index"] >= len(stages):  # every stage had finished
        ckpt.load_trainable(saved_path, model)
    model.eval()
    save_pretrained_qformer(model, os.path.join(run.output_dir, "final"))
    with open(os.path.join(run.output_dir, "log.jsonl"), "w") as handle:
        handle.writelines(json.dumps(record) + "\n" for record in result.history)
    return result


def _run_stage(run: RunConfig, index: int, stage: StageConfig, model: QFormerPretrainModel, progress: bool,
               on_step: StepCallback | None, result: PretrainResult, state: ckpt.TrainState, touched: set[str],
               saved: dict | None, saved_path: str | None) -> None:
    """One stage (already frozen per ``apply_stage``): AdamW with the stage's schedule, ``steps`` optimizer
    steps, from a checkpoint's step when ``saved`` is given."""
    batches = CaptionBatches(stage_data(run, index, stage), model, stage.batch_size, run.seed * 1000 + index)
    total = stage.steps or math.ceil(stage.epochs * batches.batches_per_epoch / stage.grad_accum)
    groups, param_names = optimizer_groups(model, stage)
    optimizer = torch.optim.AdamW(groups)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total, stage.warmup_ratio, stage.schedule))
    start = 0
    if saved is not None and saved["step"] > 0:  # mid-stage: the optimizer and schedule go on where they were
        start = ckpt.restore_mid_stage(saved_path, saved, model, optimizer, param_names, scheduler)
    elif saved is not None:  # saved at the end of the previous stage
        ckpt.load_trainable(saved_path, model)
        ckpt.restore_rng(saved_path, saved)
    for key in MODULE_KEYS:
        model.get_submodule(key).train(stage.spec(key).mode != "frozen")
    trainable = [parameter for group in groups for parameter in group["params"]]
    device = trainable[0].device
    with StopOnInterrupt() as stop:
        for step in tqdm(range(start, total), desc=stage.name, disable=not progress, initial=start, total=total):
            parts = {"loss": 0.0, "itc": 0.0, "itm": 0.0, "itg": 0.0}
            for accum in range(stage.grad_accum):
                batch = {key: value.to(device) for key, value in batches(step * stage.grad_accum + accum).items()}
                with autocast(stage.precision, device):
                    output = model(**batch)
                (output.loss / stage.grad_accum).backward()
                for name in parts:
                    parts[name] += float(getattr(output, name).detach()) / stage.grad_accum
            if stage.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(trainable, stage.max_grad_norm)
            learning_rate = scheduler.get_last_lr()[0]  # the rate this step used
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            record = {"stage": stage.name, "step": step + 1, **parts, "lr": learning_rate}
            result.history.append(record)
            state.step, state.global_step = step + 1, state.global_step + 1
            stage_done = step + 1 == total

            def save() -> str:
                where = ckpt.TrainState(index + 1, 0, state.global_step, result.history) if stage_done else \
                    ckpt.TrainState(index, step + 1, state.global_step, result.history)
                return ckpt.save_checkpoint(os.path.join(run.output_dir, "checkpoints"), model, touched, optimizer,
                                            param_names, scheduler, where)

            written = save() if stage_done or (stage.save_every and (step + 1) % stage.save_every == 0) else None
            if on_step is not None:
                on_step(record)
            if stop.requested:
                written = written or save()
                raise TrainingInterrupted(f"stopped at step {step + 1} of {total} of stage '{stage.name}'; "
                                          f"checkpoint {written}; resume with --resume", written)

"""The output side of a model that answers with images (NExT-GPT, Wu et al., arXiv 2309.05519): signal tokens the
LLM learns to emit, and the projection from their states to a generator's conditioning.

Per output modality (``image`` here; NExT-GPT also has video and audio), ``ModelConfig.output`` names:

* ``signal_tokens`` new tokens (``[IMG0]…[IMG3]``, NExT-GPT's 4 for images), added to the tokenizer. Their input
  embeddings and LM-head rows are parameters of the output side (module key ``output``): the model writes them
  over the LLM's rows at every signal position and logit column, so the LLM's own matrices never train for them
  and stay those of the checkpoint. Once the LLM emits the first, decoding writes the rest in order (a run).
* an :class:`~mmbridge.model.output.projection.OutputProjection` from the run's last hidden states, each plus its
  input embedding, to ``[queries, width]`` — the shape of the generator's text conditioning (SD-1.5: 77 × 768);
* ``align_weight``: training adds ``align_weight`` × NExT-GPT's ``l2_loss`` — the Euclidean distance per
  conditioning token between the projection of each run and the generator's own encoding of the run's caption,
  averaged (not squared) — to the LM loss, whose targets hold the signal tokens;
* ``generator`` (optional): the frozen generator the conditioning is for
  (:mod:`mmbridge.model.generators`), referenced, never saved with the model (its config is).

In an answer the modality's marker (``<image_out>``, :data:`mmbridge.data.formats.llava.OUTPUT_MARKERS`) stands for
one run: the processor writes the run's tokens in its place and the run's caption is the alignment target.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mmbridge.data.formats.llava import OUTPUT_MARKERS
from mmbridge.model.generators import Generator, build_generator
from mmbridge.model.output.projection import OutputProjection

logger = logging.getLogger("mmbridge")
MODALITIES = {"image": "IMG"}  # output modality → the stem of its signal tokens' text ([IMG0], [IMG1], …)


@dataclass
class OutputModalityConfig:
    """One output modality: its signal tokens, the projection's sizes, the conditioning shape ``queries × width``
    (checked against the generator's at build), the alignment weight and the generator."""

    signal_tokens: int = 4
    queries: int = 77
    width: int = 768
    hidden: int = 512
    encoder_layers: int = 4
    decoder_layers: int = 4
    heads: int = 4
    feed_forward: int = 2048
    align_weight: float = 1.0
    generator: dict | None = None

    def __post_init__(self) -> None:
        for name in ("signal_tokens", "queries", "width", "hidden", "heads", "feed_forward"):
            if getattr(self, name) < 1:
                raise ValueError(f"output: {name} must be >= 1, got {getattr(self, name)}")
        if self.align_weight < 0:
            raise ValueError(f"output: align_weight must be >= 0, got {self.align_weight}")


def output_configs(spec: dict | None) -> dict[str, OutputModalityConfig]:
    """``ModelConfig.output`` (``{modality: fields}``) as configs; unknown modalities or fields name themselves."""
    configs = {}
    for modality, fields in (spec or {}).items():
        if modality not in MODALITIES:
            raise ValueError(f"output modality {modality!r} is not supported; supported: {sorted(MODALITIES)}")
        if isinstance(fields, OutputModalityConfig):
            configs[modality] = fields
            continue
        known = {item.name for item in dataclasses.fields(OutputModalityConfig)}
        unknown = sorted(set(fields or {}) - known)
        if unknown:
            raise ValueError(f"output.{modality}: unknown field(s) {unknown}; valid fields: {sorted(known)}")
        configs[modality] = OutputModalityConfig(**(fields or {}))
    return configs


class ModalityOutput(nn.Module):
    """One modality's signal-token rows (input embeddings, LM-head rows) and projection."""

    def __init__(self, modality: str, config: OutputModalityConfig, token_ids: list[int], llm: nn.Module) -> None:
        super().__init__()
        self.modality = modality
        self.config = config
        self.token_ids = list(token_ids)
        width = llm.hidden_size
        embedding_mean = llm.model.get_input_embeddings().weight.detach().float().mean(0)  # as a resized row starts
        head_mean = llm.lm_head.weight.detach().float().mean(0)
        self.embeddings = nn.Parameter(embedding_mean.repeat(len(token_ids), 1))  # [S, D]
        self.head = nn.Parameter(head_mean.repeat(len(token_ids), 1))  # [S, D]
        self.projection = OutputProjection(width, config.width, config.queries, config.hidden,
                                           (config.encoder_layers, config.decoder_layers), config.heads,
                                           config.feed_forward)
        self.__dict__["generator"] = None  # the frozen generator, referenced, not registered (OutputSide.build)

    def attach_generator(self, generator: Generator) -> None:
        """Refer to ``generator`` (frozen, not a submodule); its conditioning must be ``queries × width``."""
        modality = self.modality
        if generator.modality != modality:
            raise ValueError(f"output.{modality}.generator draws {generator.modality!r}, not {modality!r}")
        generator.check_conditioning(self.config.queries, self.config.width)
        self.__dict__["generator"] = generator

    def generator_on(self, device: torch.device) -> Generator:
        """The generator, moved to ``device`` when it is elsewhere; a clear error when there is none."""
        if self.generator is None:
            raise ValueError(f"output.{self.modality}: no generator (set output.{self.modality}.generator)")
        held = next(self.generator.parameters(), None)
        if held is not None and held.device != device:
            self.generator.to(device)
        return self.generator


    def warn_truncated(self, captions: list[str]) -> None:
        """Say, once per model, that the generator's text encoder cut captions (their ends are no target)."""
        if captions and not self.__dict__.get("warned_truncation"):
            self.__dict__["warned_truncation"] = True
            logger.warning("output.%s: the generator's text encoder keeps %d tokens; captions longer than that are "
                           "truncated (their ends are no alignment target), e.g. %r", self.modality,
                           self.config.queries, captions[0])

    def runs(self, input_ids: torch.Tensor) -> list[tuple[int, int]]:
        """``(row, start)`` of every complete run of this modality's signal tokens in ``input_ids`` ``[B, L]``, in
        reading order (a run cut short, e.g. by ``max_new_tokens``, is left out)."""
        first, count = self.token_ids[0], len(self.token_ids)
        found = []
        for row, start in (input_ids == first).nonzero().tolist():
            window = input_ids[row, start:start + count].tolist()
            if window == self.token_ids:
                found.append((row, start))
        return found

    def conditioning(self, hidden: torch.Tensor, embeds: torch.Tensor,
                     runs: list[tuple[int, int]]) -> torch.Tensor:
        """The projection of each run: its positions' last hidden states plus their input embeddings,
        ``[n_runs, S, D]`` → ``[n_runs, queries, width]``."""
        count = len(self.token_ids)
        rows = torch.tensor([row for row, _ in runs for _ in range(count)], device=hidden.device)
        columns = torch.tensor([start + offset for _, start in runs for offset in range(count)], device=hidden.device)
        states = (hidden[rows, columns] + embeds[rows, columns]).view(len(runs), count, -1)  # [n, S, D]
        return self.projection(states.to(self.projection.input.weight.dtype))


class OutputSide(nn.Module):
    """Every output modality's :class:`ModalityOutput` (module key ``output``; empty for a model that writes only
    text)."""

    def __init__(self) -> None:
        super().__init__()
        self.modalities = nn.ModuleDict()

    @classmethod
    def build(cls, configs: dict[str, OutputModalityConfig], llm: nn.Module) -> "OutputSide":
        """Add each modality's signal tokens to ``llm``'s tokenizer and build its rows and projection."""
        side = cls()
        for modality, config in configs.items():
            texts = [f"[{MODALITIES[modality]}{index}]" for index in range(config.signal_tokens)]
            output = ModalityOutput(modality, config, llm.add_tokens(texts), llm)
            if config.generator is not None:  # loaded now: a conditioning shape it does not take fails at build
                output.attach_generator(build_generator(config.generator))
            side.modalities[modality] = output
        return side

    def export_configs(self) -> dict[str, dict] | None:
        """``ModelConfig.output`` as built: each generator's own config (an absolute path) in place of the spec."""
        exported = {}
        for modality, output in self.modalities.items():
            fields = dataclasses.asdict(output.config)
            if output.generator is not None:
                generator = output.generator.export_config()
                fields["generator"] = dataclasses.asdict(generator) if dataclasses.is_dataclass(generator) \
                    else dict(generator)
            exported[modality] = fields
        return exported or None

    def token_texts(self, modality: str) -> str:
        """The text of one run of ``modality``'s signal tokens (what a marker in an answer becomes)."""
        stem = MODALITIES[modality]
        return "".join(f"[{stem}{index}]" for index in range(len(self.modalities[modality].token_ids)))

    @property
    def signal_ids(self) -> list[int]:
        return [token for output in self.modalities.values() for token in output.token_ids]

    # -- the sequence ---------------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """``embeds`` ``[B, L, D]`` with the output side's embedding at every signal position."""
        for output in self.modalities.values():
            for index, token in enumerate(output.token_ids):
                mask = (input_ids == token).unsqueeze(-1)  # [B, L, 1]
                embeds = torch.where(mask, output.embeddings[index].to(embeds.dtype), embeds)
        return embeds

    def logits(self, hidden: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` ``[..., V]`` with the signal tokens' columns computed from the output side's head rows."""
        for output in self.modalities.values():
            columns = hidden @ output.head.to(hidden.dtype).T  # [..., S]
            logits = logits.index_copy(-1, torch.tensor(output.token_ids, device=logits.device),
                                       columns.to(logits.dtype))
        return logits

    def forced_next(self, tokens: torch.Tensor) -> torch.Tensor:
        """Per row of ``tokens`` ``[B]`` (the last emitted), the signal token a run still needs next, or -1."""
        forced = torch.full_like(tokens, -1)
        for output in self.modalities.values():
            for index, token in enumerate(output.token_ids[:-1]):
                forced = torch.where(tokens == token, torch.full_like(tokens, output.token_ids[index + 1]), forced)
        return forced

    # -- training -------------------------------------------------------------------------------------
    def targets(self, captions: dict[str, list[str]] | None,
                targets: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """Per modality, the alignment targets ``[n_runs, queries, width]``: given, or the modality's generator's
        encodings of ``captions`` (frozen: no gradient)."""
        result = dict(targets or {})
        for modality, texts in (captions or {}).items():
            if modality in result or not texts:
                continue
            if modality not in self.modalities:
                raise ValueError(f"the batch holds {modality} captions but the model has no {modality} output "
                                 f"side (output modalities: {sorted(self.modalities)})")
            output = self.modalities[modality]
            generator = output.generator_on(output.head.device)
            with torch.no_grad():
                encoded = generator.encode_text(texts)
            result[modality] = encoded.embeds.float()
            output.warn_truncated([text for text, cut in zip(texts, encoded.truncated) if cut])
        return result

    def align_losses(self, input_ids: torch.Tensor, hidden: torch.Tensor, embeds: torch.Tensor,
                     targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{f"{modality}_align": align_weight × l2}`` for each modality with ``targets`` ``[n_runs, Q, W]``
        (the generator's encodings of the runs' captions, in run order); a count mismatch names both counts."""
        losses = {}
        for modality, target in targets.items():
            output = self.modalities[modality]
            runs = output.runs(input_ids)
            if len(runs) != target.shape[0]:
                raise ValueError(f"the batch holds {len(runs)} complete {modality} signal-token run(s) but "
                                 f"{target.shape[0]} caption target(s) were given")
            if not runs:
                continue
            predicted = output.conditioning(hidden, embeds, runs)  # [n, Q, W]
            losses[f"{modality}_align"] = output.config.align_weight * l2_per_token(predicted, target.to(predicted))
        return losses


def l2_per_token(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """NExT-GPT's ``l2_loss``: the Euclidean distance of each conditioning token ``[..., W]``, averaged."""
    return (predicted.float() - target.float()).norm(dim=-1).mean()


def describe(side: OutputSide) -> list[str]:
    """One line per output modality, for ``mmbridge info``."""
    lines = []
    for modality, output in side.modalities.items():
        config: Any = output.config
        generator = config.generator or {}
        lines.append(f"output {modality}: {len(output.token_ids)} signal tokens {side.token_texts(modality)!r} "
                     f"(marker {OUTPUT_MARKERS[modality]!r}) → {config.queries}×{config.width} conditioning; generator "
                     f"{generator.get('type', 'none')} {generator.get('path', '')}".rstrip())
    return lines

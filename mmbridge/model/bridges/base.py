"""The bridge contract: the one base class the core talks to, with a neutral default for every hook, and its registry.

A bridge turns one image's encoder features into what the LLM reads. The core
(:class:`~mmbridge.model.multimodal.MultimodalModel`, ``generate``, the trainer, the eval harness, the server)
calls only the methods below and never asks what kind of bridge it holds.

**Layout.** For the encoder's :class:`~mmbridge.model.grid.FeatureGrid` a bridge says how many tokens it
returns per image (:meth:`Bridge.num_tokens`) and where they lie (:meth:`Bridge.token_grid`: ``(rows, cols)``
of the image, row-major, or None for tokens with no place in the image, such as learned latents);
:meth:`Bridge.forward` is given that grid with the features ``[B, N, D_v]`` and returns ``[B, M, D_llm]``.
High-resolution strategies stitch token grids and the region–word objective reads one, both from
``token_grid``; :meth:`Bridge.grid_divisor` says what the grid's sides must divide by (pixel shuffle's factor).

**The sequence.** By default each ``<image>`` expands to ``num_tokens`` positions and the visual tokens are
written there (:meth:`Bridge.embed_images`); a bridge may instead keep markers and reach the LLM another way.

**Inside the LLM** (cross-attention, deep fusion; :mod:`mmbridge.model.fusion`). :meth:`Bridge.attach` adds
the parts that act in the LLM's layers. Per call they read one :class:`FusionCall`, which they never write:
the call's image mask, the attention mask, the bridge's *prompt state* (:meth:`Bridge.prompt_state`: what a
prompt's images and placeholders say, made once per ``forward`` or once per ``generate`` run and kept for every
decoding step) and its *call state* (:meth:`Bridge.call_state`: derived once per call, e.g. which latents each
position reads). What a module caches across calls (the latents' keys and values) lives on the module and is
dropped by :meth:`Bridge.release_caches`, which whoever made the prompt state calls when its run ends.

**Training and reporting.** :meth:`Bridge.training_outputs` (auxiliary losses and counts after a training
forward); the :class:`StageHooks` every bridge has — ``check_stage`` / ``start_stage`` (what a stage asks of the
bridge, e.g. MoE upcycling), ``step_report`` (numbers logged every step), ``after_update`` /
``tracked_parameters`` (weights updated after each optimizer step without gradients, e.g. an EMA, and
checkpointed), ``write_plots`` (figures at the end of a stage); :meth:`Bridge.inactive_parameters_per_token` (``mmbridge info``).

**Saving and processing.** :meth:`Bridge.export_config` (the config that rebuilds it as it is now),
:attr:`Bridge.tokenizer` (its own text tokenizer, saved beside the model), :meth:`Bridge.processor_needs`
(what the processor must do for it: an end-of-chunk token, videos as one media, instruction text).
"""

from __future__ import annotations

import abc
import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mmbridge.data.bridge_inputs import BridgeInputs
from mmbridge.model.grid import FeatureGrid
from mmbridge.registry import Registry

BRIDGES: Registry["Bridge"] = Registry("bridge")


@dataclass(frozen=True)
class ProcessorNeeds:
    """What a bridge needs from the model's processor: ``chunk_token`` ends each chunk of an interleaved document
    (Flamingo's ``<|endofchunk|>``); ``text_tokenizer`` tokenizes each image's instruction into ``bridge_inputs``
    (InstructBLIP); ``video_frames``: a video's frames reach the bridge as one media of at most this many frames
    (None: each frame is an image)."""

    chunk_token: str | None = None
    text_tokenizer: Any = None
    video_frames: int | None = None


@dataclass(frozen=True)
class FusionCall:
    """What modules inside the LLM read during one forward (they never write it).

    ``image_mask`` ``[B, L]``: True at this call's visual-token positions; ``attention_mask`` ``[B, L_total]``
    (the cache included) or None; ``prompt``: the bridge's prompt state (the same object for the prefill and every
    step of one ``generate`` run); ``state``: the bridge's per-call state; ``training``: labels were given, so
    modules keep what :meth:`Bridge.training_outputs` reads.
    """

    image_mask: torch.Tensor
    attention_mask: torch.Tensor | None = None
    prompt: Any = None
    state: Any = None
    training: bool = False

    @functools.cached_property
    def image_positions(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(rows, columns)`` of the visual tokens of this call, or None when it has none (computed once)."""
        return self.image_mask.nonzero(as_tuple=True) if bool(self.image_mask.any()) else None


class StageHooks:
    """What the trainer asks of ``model.bridge`` around a stage, with neutral defaults: every :class:`Bridge` has
    them, and so does a stage-1 head that is not one (BLIP-2's ITC/ITM/ITG heads)."""

    def check_stage(self, stage: Any) -> None:
        """A ``ValueError`` when a training stage asks what this bridge cannot do (before any stage trains)."""
        if getattr(stage, "upcycle", False):
            raise ValueError(f"stage '{stage.name}' sets upcycle, which copies FFNs into MoE experts, but the "
                             f"bridge ({type(self).__name__}) has none: use bridge type 'moe'")

    def start_stage(self, stage: Any) -> None:
        """Called as a training stage begins, before its parameters are frozen or unfrozen."""

    def step_report(self) -> dict[str, Any]:
        """Numbers to log with every training step (none by default)."""
        return {}

    def after_update(self, step: int) -> None:
        """Called after optimizer step ``step`` (0-based, within the stage) has changed the weights, e.g. to update
        a moving average of them (nothing by default)."""

    def tracked_parameters(self) -> list[str]:
        """Names (under the bridge) of frozen parameters that change while training without gradients, e.g. a
        moving average: checkpointed with the trained ones, so a resumed run restores them (none by default)."""
        return []

    def write_plots(self, records: list[dict], directory: str, number: int, name: str) -> list[str]:
        """Figures of stage ``number`` (1-based) ``name`` from its step records, written into ``directory``; returns
        their paths (none by default)."""
        return []


class Bridge(StageHooks, nn.Module, abc.ABC):
    """Base class of every bridge; subclasses implement the three abstract methods and override hooks they need."""

    fuses_into_llm = False  # True: parts act inside the LLM's layers (decoding then keeps the model's own forward)
    tokenizer: Any = None  # the bridge's own text tokenizer (instruction-aware bridges), saved beside the model

    # -- layout -----------------------------------------------------------------------------------
    @abc.abstractmethod
    def num_tokens(self, grid: FeatureGrid) -> int:
        """Tokens per image for encoder features laid out as ``grid``."""

    @abc.abstractmethod
    def token_grid(self, grid: FeatureGrid) -> tuple[int, int] | None:
        """``(rows, cols)`` of the image that the returned tokens cover in row-major order, or None when they have
        no place in the image (latents, queries, markers)."""

    @abc.abstractmethod
    def forward(self, features: torch.Tensor, grid: FeatureGrid,
                inputs: BridgeInputs | None = None) -> torch.Tensor:  # [B, N, D_v] -> [B, M, D]
        """Map encoder features ``[B, N, D_v]`` laid out as ``grid`` to visual tokens ``[B, M, D_llm]``; ``inputs``
        holds per-image extras (one row per image of ``features``)."""

    def grid_divisor(self) -> int:
        """The feature grid's rows and columns must be multiples of this (1: any grid)."""
        return 1

    # -- saving and processing ----------------------------------------------------------------------
    def export_config(self, config: Any = None) -> Any:
        """The config that rebuilds this bridge as it is now; ``config`` is the one it was built from."""
        return config

    def processor_needs(self) -> ProcessorNeeds:
        """What the model's processor must do for this bridge (by default: tokenize instructions with its own
        tokenizer, if it has one)."""
        return ProcessorNeeds(text_tokenizer=self.tokenizer)

    # -- the sequence -------------------------------------------------------------------------------
    def attach(self, llm: nn.Module) -> None:
        """Build the parts that act inside ``llm`` (a :class:`~mmbridge.model.llm.base.LanguageModel`); none here."""

    def embed_images(self, input_ids: torch.Tensor, embeds: torch.Tensor, image_mask: torch.Tensor,
                     image_tokens: torch.Tensor, prompt: Any = None) -> torch.Tensor:
        """``embeds`` ``[B, L, D]`` with the visual tokens (``[n, M, D]``, or ``[sum M_i, D]`` for images of different
        counts) written at the ``image_mask`` positions; a ``ValueError`` naming both counts when they differ.
        ``prompt``: the call's prompt state (:meth:`prompt_state`)."""
        slots = int(image_mask.sum())
        if image_tokens.dim() == 2:  # images of different token counts (high resolution)
            if image_tokens.shape[0] != slots:
                raise ValueError(f"input_ids hold {slots} <image> token positions but the images' visual tokens "
                                 f"number {image_tokens.shape[0]}")
        elif image_tokens.shape[0] * image_tokens.shape[1] != slots:
            count, per_image = image_tokens.shape[:2]
            raise ValueError(f"input_ids hold {slots} <image> token positions but {count} image(s) × "
                             f"{per_image} visual tokens = {count * per_image} were given")
        return embeds.masked_scatter(image_mask.unsqueeze(-1), image_tokens.to(embeds.dtype))

    def prompt_state(self, image_mask: torch.Tensor, attention_mask: torch.Tensor | None,
                     image_tokens: torch.Tensor | None, image_attention_mask: torch.Tensor | None = None) -> Any:
        """What a prompt says that every call of its run reads (None by default). ``image_attention_mask``
        ``[B, L, n_slots]`` (IDEFICS' layout: which image each position reads) only suits cross-attention bridges."""
        if image_attention_mask is not None:
            raise ValueError(f"image_attention_mask says which images each position cross-attends to; this model's "
                             f"bridge ({type(self).__name__}) has no cross-attention")
        return None

    def call_state(self, image_mask: torch.Tensor, attention_mask: torch.Tensor | None, prompt: Any) -> Any:
        """What modules inside the LLM derive once per call from its image mask and the prompt state (None)."""
        return None

    def position_ids(self, image_mask: torch.Tensor, attention_mask: torch.Tensor | None,
                     tokens_per_image: int) -> torch.Tensor | None:
        """Position ids ``[B, L]`` this bridge wants for a sequence, or None for the model's default."""
        return None

    def release_caches(self) -> None:
        """Drop what modules keep for one run (the latents' keys and values); nothing here."""

    # -- training -----------------------------------------------------------------------------------
    def training_outputs(self, call: FusionCall) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """After a training forward: auxiliary loss terms (weighted, added to the loss) and counts to log (lists,
        summed over micro-batches). None by default."""
        return {}, {}

    # -- reporting ----------------------------------------------------------------------------------
    def inactive_parameters_per_token(self) -> int:
        """Parameters of this bridge (and of the LLM it bypasses) that one token does not use."""
        return 0


def build_bridge(spec: Any, in_dim: int, out_dim: int) -> Bridge:
    """Build a bridge from a dict (``{"type": "mlp", ...}``) or a registered config."""
    return BRIDGES.build(spec, in_dim, out_dim)


class TokenWiseBridge(Bridge, abc.ABC):
    """A bridge that maps each feature to one token (projectors): its tokens lie where the features do."""

    def num_tokens(self, grid: FeatureGrid) -> int:
        return grid.count

    def token_grid(self, grid: FeatureGrid) -> tuple[int, int] | None:
        """The feature grid, when every feature is a cell of it (no CLS token kept, not a plain sequence)."""
        return (grid.rows, grid.cols) if grid.spatial else None

"""Feature cache: a frozen vision encoder's outputs, computed once and reused by every epoch and run.

A stage whose encoder is frozen (LLaVA's stage 1, and stage 2 when the tower stays frozen)
feeds the same images through the same weights every epoch. With ``data.feature_cache: DIR``
the trainer runs the encoder once over the data set (batched, without autograd, with a
progress bar), stores the per-image outputs ``[N, D_v]`` and then trains from them: examples
carry ``image_features`` instead of ``pixel_values`` and the model runs only the bridge
(:meth:`~mmbridge.model.multimodal.MultimodalModel.forward`). Images are neither opened nor
transformed again.

Key: a sha256 over everything the features depend on — the encoder's ``export_config``, a
sha256 of its weights and buffers, the :class:`~mmbridge.model.vision.transform.ImageTransform`,
the precision they are computed in (bf16 autocast or fp32), each source's path, size and
modification time (a MiniWorld source: its spec), every sample id and every image file's
path, size and modification time. Any change gives a new key, so a stale cache is never
read: the features are recomputed into a new directory ``DIR/<key>/`` (old ones are left for
the user to delete).

Layout of ``DIR/<key>/``: shards ``features-00000.safetensors`` … (one tensor per sample,
named by its position in the data set, ``[n_images, N, D_v]``) and ``index.json`` (key,
shapes, where each sample lives, samples whose images could not be loaded). The directory is
computed as ``DIR/.<key>.partial-XXXX`` and renamed into place once ``index.json`` is written,
so ``DIR/<key>/`` is always complete: a failed build removes its staging directory, and one a
killed process left behind is removed by the next build of the same cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from mmbridge.data.formats.llava import Sample
from mmbridge.data.collate import concat_padded, pad_stack
from mmbridge.model.highres.base import crop_features
from mmbridge.data.mixture import MixtureDataset, SourceConfig
from mmbridge.data.processor import SampleError
from mmbridge.train.recipe import autocast
from mmbridge.utils import atomic_path, atomic_write_json, eval_mode, make_shareable

logger = logging.getLogger("mmbridge")

CACHE_FORMAT = 1
INDEX_FILE = "index.json"
SHARD_PATTERN = "features-{:05d}.safetensors"
DEFAULT_SHARD_BYTES = 256 * 2**20
DEFAULT_BATCH_IMAGES = 16
STAGING_SUFFIX = ".partial-"  # DIR/.<key>.partial-XXXX: a cache being computed, renamed to DIR/<key> when complete


# -- key -------------------------------------------------------------------------------------------
def weights_digest(module: nn.Module) -> str:
    """sha256 over every tensor of ``module.state_dict()`` (name, dtype, shape, bytes), in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{data.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _file_stamp(path: str) -> list:
    """``[path, size, mtime_ns]`` of a file, ``[path, None, None]`` when it does not exist."""
    try:
        stat = os.stat(path)
    except OSError:
        return [path, None, None]
    return [path, stat.st_size, stat.st_mtime_ns]


def _source_stamp(source: SourceConfig) -> Any:
    """What a source's samples depend on: its file (path, size, mtime), its shards' or its type's spec (MiniWorld's
    stamp is ``{"miniworld": spec}``)."""
    if source.type is not None:
        return {source.type: source.spec}
    if source.webdataset is not None:
        from mmbridge.data.formats.webdataset import expand_shards

        return {"webdataset": [_file_stamp(os.path.abspath(shard)) for shard in expand_shards(source.webdataset)]}
    return {"file": _file_stamp(os.path.abspath(source.path)), "image_root": source.image_root}


def _plain(config: Any) -> Any:
    """A JSON-able form of an encoder's ``export_config`` (dataclass or dict)."""
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config


def _sample_stamp(sample: Sample) -> list:
    """A sample's id and its images; files are stamped, streamed images are named only."""
    images = [image if sample.image_loader is not None else _file_stamp(image) for image in sample.images]
    return [sample.id, images]


def cache_key(dataset: MixtureDataset, vision: nn.Module, precision: str) -> str:
    """The sha256 naming the cache of ``vision``'s outputs on ``dataset`` computed in ``precision``."""
    digest = hashlib.sha256()
    highres = dataset.processor.highres
    head = {"highres": highres.export_config() if highres is not None else None, "format": CACHE_FORMAT, "encoder": _plain(vision.export_config()), "weights": weights_digest(vision),
            "transform": dataset.processor.transform.to_dict(), "precision": precision,
            "sources": [_source_stamp(source) for source in dataset.config.sources]}
    digest.update(json.dumps(head, sort_keys=True, default=str).encode())
    for sample in dataset.samples:
        digest.update(json.dumps(_sample_stamp(sample), default=str).encode())
    return digest.hexdigest()


# -- reading ---------------------------------------------------------------------------------------
class FeatureCache:
    """A complete cache directory: per-sample encoder outputs looked up by data-set position."""

    def __init__(self, directory: str, index: dict) -> None:
        self.directory = directory
        self.index = index
        self._handles: dict[str, Any] = {}
        self._handles_pid = os.getpid()  # handles are per process: a loader worker opens its own

    @classmethod
    def open(cls, directory: str) -> "FeatureCache":
        """Open a directory written by :func:`build_feature_cache` (it must hold ``index.json``)."""
        with open(os.path.join(directory, INDEX_FILE)) as handle:
            index = json.load(handle)
        if index.get("format") != CACHE_FORMAT:
            raise ValueError(f"{directory}: feature cache format {index.get('format')!r}, expected {CACHE_FORMAT}")
        return cls(directory, index)

    @property
    def key(self) -> str:
        return self.index["key"]

    def skipped_reason(self, position: int) -> str | None:
        """Why the images of sample ``position`` are missing from the cache (``None``: they are not)."""
        return self.index["skipped"].get(str(position))

    def features(self, position: int) -> torch.Tensor | None:
        """Encoder outputs of sample ``position``, ``[n_images, N, D_v]``; ``None`` for a sample without images."""
        entry = self.index["entries"].get(str(position))
        if entry is None:
            return None
        shard = entry["shard"]
        if self._handles_pid != os.getpid():  # forked with the parent's handles: never share a file position
            self._handles, self._handles_pid = {}, os.getpid()
        if shard not in self._handles:
            self._handles[shard] = safe_open(os.path.join(self.directory, shard), framework="pt")
        return self._handles[shard].get_tensor(str(position))


# -- writing ---------------------------------------------------------------------------------------
class _ShardWriter:
    """Collects per-sample tensors and writes a shard (atomically) whenever ``shard_bytes`` are reached."""

    def __init__(self, directory: str, shard_bytes: int) -> None:
        self.directory, self.shard_bytes = directory, shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.entries: dict[str, dict] = {}
        self.shards: list[str] = []

    def add(self, position: int, sample_id: str, features: torch.Tensor) -> None:
        self.pending[str(position)] = features
        self.pending_bytes += features.numel() * features.element_size()
        self.entries[str(position)] = {"id": sample_id, "images": int(features.shape[0]),
                                       "shard": SHARD_PATTERN.format(len(self.shards))}
        if self.pending_bytes >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        name = SHARD_PATTERN.format(len(self.shards))
        write_shard(os.path.join(self.directory, name), self.pending)
        self.shards.append(name)
        self.pending, self.pending_bytes = {}, 0


def write_shard(path: str, tensors: dict[str, torch.Tensor]) -> None:
    """Write one safetensors shard (tensors made contiguous) through a temporary file and a rename."""
    with atomic_path(path) as temporary:
        save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, temporary)


class _Encoder:
    """Runs the frozen encoder on batches of images from several samples and hands back per-sample rows.

    With a high-resolution strategy the rows are the images' crops: each crop is encoded at its own size
    (as the model does) and the sample's features are ``[n_crops, N_max, D_v]``, right-padded."""

    def __init__(self, vision: nn.Module, precision: str, writer: _ShardWriter, batch_images: int,
                 highres: Any = None) -> None:
        self.vision, self.precision, self.writer, self.batch_images = vision, precision, writer, batch_images
        self.highres = highres
        self.device = next(vision.parameters(), torch.empty(0)).device
        self.pending: list[tuple[int, str, torch.Tensor, torch.Tensor | None]] = []

    def add(self, position: int, sample_id: str, pixel_values: torch.Tensor, sizes: torch.Tensor | None) -> None:
        self.pending.append((position, sample_id, pixel_values, sizes))
        if sum(len(pending[2]) for pending in self.pending) >= self.batch_images:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        pixels = concat_padded([pending[2] for pending in self.pending]).to(self.device)  # [n, 3, H, W]
        with torch.inference_mode(), autocast(self.precision, self.device):
            if self.highres is None:
                features = self.vision(pixels).to("cpu")  # [n, N, D_v]
            else:
                sizes = torch.cat([pending[3] for pending in self.pending])  # [n_images, 2]
                features = pad_stack(crop_features(self.highres, pixels, sizes, self.vision)).to("cpu")
        rows = features.split([len(pending[2]) for pending in self.pending])
        for (position, sample_id, _, _), sample_features in zip(self.pending, rows):
            # grid encoders (a CNN's [B, C, h, w] read as [B, h*w, C]) give a transposed view; safetensors
            # stores only contiguous tensors, and a row of its own frees the batch
            self.writer.add(position, sample_id, sample_features.clone(memory_format=torch.contiguous_format))
        self.pending = []


def _pixels(dataset: MixtureDataset, sample: Sample) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The transformed images of ``sample``, ``[n, 3, H, W]`` (a high-resolution model's crops), and the images'
    sizes ``[n_images, 2]`` when a strategy needs them (raises :class:`SampleError` on a bad file)."""
    processor = dataset.processor
    images = processor.load_images(sample)
    sizes = torch.tensor([(image.height, image.width) for image in images]) if processor.highres is not None else None
    return processor.pixel_values(images), sizes


def _compute(directory: str, dataset: MixtureDataset, vision: nn.Module, precision: str, batch_images: int,
             shard_bytes: int, progress: bool) -> tuple[_ShardWriter, dict[str, str]]:
    """Encode every sample's images into shards under ``directory``; returns the writer and skipped samples."""
    writer = _ShardWriter(directory, shard_bytes)
    encoder = _Encoder(vision, precision, writer, batch_images, dataset.processor.highres)
    skipped: dict[str, str] = {}
    with eval_mode(vision):
        for position, sample in enumerate(tqdm(dataset.samples, desc="feature cache", unit="sample",
                                               disable=not progress, dynamic_ncols=True)):
            if not sample.images:
                continue
            try:
                encoder.add(position, sample.id, *_pixels(dataset, sample))
            except SampleError as error:
                if not dataset.config.skip_bad_samples:
                    raise
                skipped[str(position)] = error.reason
        encoder.flush()
    writer.flush()
    return writer, skipped


def build_feature_cache(root: str, dataset: MixtureDataset, vision: nn.Module, precision: str = "fp32",
                        batch_images: int = DEFAULT_BATCH_IMAGES, shard_bytes: int = DEFAULT_SHARD_BYTES,
                        progress: bool = True) -> FeatureCache:
    """The cache of ``vision``'s outputs on ``dataset`` under ``root``: opened if complete, else computed.

    ``precision`` (``"bf16"`` or ``"fp32"``) must be the training stage's, so cached features equal
    those the encoder would produce inside the stage's autocast.
    """
    key = cache_key(dataset, vision, precision)
    directory = os.path.join(root, key)
    if os.path.isfile(os.path.join(directory, INDEX_FILE)):
        logger.info("feature cache: reusing %s", directory)
        return FeatureCache.open(directory)
    os.makedirs(root, exist_ok=True)
    _remove_stale_staging(root, key)
    logger.info("feature cache: computing %s (%d samples)", directory, len(dataset.samples))
    staging = tempfile.mkdtemp(dir=root, prefix=f".{key}{STAGING_SUFFIX}")
    try:
        writer, skipped = _compute(staging, dataset, vision, precision, batch_images, shard_bytes, progress)
        index = {"format": CACHE_FORMAT, "key": key, "precision": precision, "samples": len(dataset.samples),
                 "images": sum(entry["images"] for entry in writer.entries.values()), "shards": writer.shards,
                 "entries": writer.entries, "skipped": skipped}
        atomic_write_json(os.path.join(staging, INDEX_FILE), index)
        if os.path.isdir(directory):  # an incomplete directory (no index) left by an older mmbridge
            shutil.rmtree(directory)
        make_shareable(staging)
        os.replace(staging, directory)
    finally:
        if os.path.isdir(staging):
            shutil.rmtree(staging, ignore_errors=True)
    return FeatureCache(directory, index)


def _remove_stale_staging(root: str, key: str) -> None:
    """Delete staging directories a killed build of the same cache left behind (one builder at a time)."""
    for name in os.listdir(root):
        if name.startswith(f".{key}{STAGING_SUFFIX}"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


# -- data set --------------------------------------------------------------------------------------
class CachedFeatureDataset(torch.utils.data.Dataset):
    """A :class:`MixtureDataset` whose examples carry cached ``image_features`` instead of ``pixel_values``.

    Text processing, sample order, length grouping and bad-sample skipping are the wrapped
    data set's; a sample whose images failed to load when the cache was built is skipped (or
    raises) with the reason recorded then.
    """

    def __init__(self, dataset: MixtureDataset, cache: FeatureCache) -> None:
        self.dataset = dataset
        self.cache = cache

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict | None:
        sample = self.dataset.samples[index]
        try:
            example = self._example(index, sample)
        except SampleError as error:
            if not self.dataset.config.skip_bad_samples:
                raise
            self.dataset.skipped[error.reason] += 1
            self.dataset.skipped_samples.append((sample.id, error.reason))
            return None
        example["source"] = sample.source
        return example

    def _example(self, index: int, sample: Sample) -> dict:
        reason = self.cache.skipped_reason(index)
        if reason is not None:
            raise SampleError(f"sample {sample.id!r}: its images could not be loaded when the feature cache "
                              f"{self.cache.directory} was built ({reason})", sample.id, reason)
        processor = self.dataset.processor
        example = processor(sample, pixels=False)
        features = self.cache.features(index)
        if features is not None and processor.video_as_media and sample.video and len(features):
            features = features[processor.video_frames(len(features))]  # the frames the processor keeps
        if features is not None:
            example["image_features"] = features  # [n_images, N, D_v]
        return example

    # the wrapped data set's settings, order, lengths and skip counts
    @property
    def config(self) -> Any:
        return self.dataset.config

    @property
    def samples(self) -> list[Sample]:
        return self.dataset.samples

    @property
    def skipped(self) -> Any:
        return self.dataset.skipped

    @property
    def skipped_samples(self) -> list[tuple[str, str]]:
        return self.dataset.skipped_samples

    def epoch_indices(self, epoch: int, seed: int) -> list[int]:
        return self.dataset.epoch_indices(epoch, seed)

    def lengths(self) -> list[int]:
        return self.dataset.lengths()

    def source_counts(self, indices: list[int]) -> dict[str, int]:
        return self.dataset.source_counts(indices)

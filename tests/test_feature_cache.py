"""Feature cache: training from cached encoder outputs equals training from pixels; keys and atomic writes.

A tiny CLIP tower (16 px) → MLP → 2-layer Llama trains its bridge on 12 generated shape
images. Losses with and without the cache are compared in fp32; the cache key must change
with the transform, a data file, an image file and the encoder weights; a write killed
mid-way leaves no ``index.json`` and the next build recomputes the cache.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from mmbridge.config import RunConfig
from mmbridge.data import DataConfig, MixtureDataset
from mmbridge.data.processor import Processor
from mmbridge.model.multimodal import MultimodalModel
from mmbridge.testing import tiny_model_config, write_shape_dataset
from mmbridge.train import feature_cache, train
from mmbridge.train.feature_cache import INDEX_FILE, CachedFeatureDataset, build_feature_cache

STAGE = {"name": "align", "train": {"bridge": "full"}, "lr": 1e-2, "batch_size": 4, "precision": "fp32", "steps": 5}


@pytest.fixture()
def data_json(tmp_path) -> str:
    return write_shape_dataset(str(tmp_path / "shapes"), 12, seed=3)


def _model_config(tokenizer_dir: str) -> dict:
    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir)) + 1
    config = tiny_model_config(tokenizer_dir, vocab)
    config["llm"]["hf_config"]["initializer_range"] = 0.2
    return config


def _run(tokenizer_dir: str, data_json: str, output: str, cache: str | None, stage: dict = STAGE) -> RunConfig:
    data = {"sources": [{"path": data_json}], "max_length": 128, "feature_cache": cache}
    return RunConfig(model=_model_config(tokenizer_dir), stages=[stage], output_dir=output, seed=0, data=data)


def _dataset_and_vision(tokenizer_dir: str, data_json: str, **data: object) -> tuple[MixtureDataset, torch.nn.Module]:
    torch.manual_seed(0)
    model = MultimodalModel.from_config(_model_config(tokenizer_dir))
    dataset = MixtureDataset(DataConfig(sources=[{"path": data_json}], **data), model.processor())
    return dataset, model.vision


def _forbid_image_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self, sample):  # noqa: ANN001 - replaces a method
        raise AssertionError(f"image of {sample.id} loaded although the features are cached")

    monkeypatch.setattr(Processor, "load_images", refuse)


def test_training_from_cache_matches_pixels(tokenizer_dir, data_json, tmp_path, monkeypatch):
    cache_root = str(tmp_path / "cache")
    plain = train(_run(tokenizer_dir, data_json, str(tmp_path / "plain"), None), progress=False)
    first = train(_run(tokenizer_dir, data_json, str(tmp_path / "first"), cache_root), progress=False)
    (key,) = os.listdir(cache_root)
    assert os.path.isfile(os.path.join(cache_root, key, INDEX_FILE))
    assert os.path.isfile(os.path.join(cache_root, key, "features-00000.safetensors"))
    _forbid_image_loading(monkeypatch)  # the second cached run reads features only
    second = train(_run(tokenizer_dir, data_json, str(tmp_path / "second"), cache_root), progress=False)
    expected = [record["loss"] for record in plain.history]
    for result in (first, second):
        assert [record["loss"] for record in result.history] == pytest.approx(expected, abs=1e-6, rel=0)
        torch.testing.assert_close(result.model.bridge.linear_1.weight, plain.model.bridge.linear_1.weight,
                                   atol=1e-6, rtol=0)


def test_stage_with_trained_encoder_ignores_cache(tokenizer_dir, data_json, tmp_path):
    stage = {**STAGE, "train": {"bridge": "full", "vision": {"mode": "partial", "layers": 1}}, "steps": 1}
    train(_run(tokenizer_dir, data_json, str(tmp_path / "run"), str(tmp_path / "cache"), stage), progress=False)
    assert not os.path.exists(tmp_path / "cache")


def test_cached_features_equal_encoder_outputs(tokenizer_dir, data_json, tmp_path):
    dataset, vision = _dataset_and_vision(tokenizer_dir, data_json)
    cache = build_feature_cache(str(tmp_path / "cache"), dataset, vision, batch_images=5, progress=False)
    cached = CachedFeatureDataset(dataset, cache)
    for index in (0, 7, 11):
        example = cached[index]
        assert "pixel_values" not in example
        with torch.no_grad():
            expected = vision(dataset[index]["pixel_values"])  # [1, N, D_v]
        torch.testing.assert_close(example["image_features"], expected, atol=1e-6, rtol=0)
        assert torch.equal(example["input_ids"], dataset[index]["input_ids"])


def _rewrite(path: str, change) -> None:  # noqa: ANN001 - a callable on the loaded JSON
    with open(path) as handle:
        samples = json.load(handle)
    with open(path, "w") as handle:
        json.dump(change(samples), handle)


def test_key_changes_with_every_input(tokenizer_dir, data_json, tmp_path):
    dataset, vision = _dataset_and_vision(tokenizer_dir, data_json)
    key = feature_cache.cache_key(dataset, vision, "fp32")
    assert feature_cache.cache_key(dataset, vision, "fp32") == key
    assert feature_cache.cache_key(dataset, vision, "bf16") != key

    dataset.processor.transform.mean = (0.4, 0.4, 0.4)  # a preprocessing change
    assert feature_cache.cache_key(dataset, vision, "fp32") != key
    dataset, vision = _dataset_and_vision(tokenizer_dir, data_json)
    with torch.no_grad():
        vision.model.post_layernorm.weight.add_(1.0)  # new encoder weights
    assert feature_cache.cache_key(dataset, vision, "fp32") != key

    dataset, vision = _dataset_and_vision(tokenizer_dir, data_json)
    image = os.path.join(os.path.dirname(data_json), "images", "0003.png")
    Image.new("RGB", (40, 40), (1, 2, 3)).save(image)  # an image file changes, the JSON does not
    assert feature_cache.cache_key(dataset, vision, "fp32") != key
    image_key = feature_cache.cache_key(dataset, vision, "fp32")

    _rewrite(data_json, lambda samples: samples[:-1])  # the data file changes
    dataset, vision = _dataset_and_vision(tokenizer_dir, data_json)
    assert feature_cache.cache_key(dataset, vision, "fp32") not in (key, image_key)


def test_changed_input_recomputes_into_new_directory(tokenizer_dir, data_json, tmp_path):
    root = str(tmp_path / "cache")
    dataset, vision = _dataset_and_vision(tokenizer_dir, data_json)
    first = build_feature_cache(root, dataset, vision, progress=False)
    again = build_feature_cache(root, dataset, vision, progress=False)
    assert again.directory == first.directory
    dataset.processor.transform.std = (0.2, 0.2, 0.2)
    changed = build_feature_cache(root, dataset, vision, progress=False)
    assert changed.directory != first.directory and sorted(os.listdir(root)) == sorted([first.key, changed.key])
    assert not torch.equal(changed.features(0), first.features(0))


def test_killed_write_leaves_no_index_and_is_recomputed(tokenizer_dir, data_json, tmp_path, monkeypatch):
    root = str(tmp_path / "cache")
    dataset, vision = _dataset_and_vision(tokenizer_dir, data_json)
    real_write = feature_cache.write_shard
    written: list[str] = []

    def die_after_first_shard(path: str, tensors: dict) -> None:
        if written:
            raise KeyboardInterrupt("killed")
        real_write(path, tensors)
        written.append(path)

    monkeypatch.setattr(feature_cache, "write_shard", die_after_first_shard)
    with pytest.raises(KeyboardInterrupt):
        build_feature_cache(root, dataset, vision, batch_images=2, shard_bytes=1, progress=False)
    assert os.listdir(root) == [] and len(written) == 1  # the staging directory went with the failure
    key = feature_cache.cache_key(dataset, vision, "fp32")
    stale = os.path.join(root, f".{key}{feature_cache.STAGING_SUFFIX}killed")
    os.makedirs(stale)  # what a SIGKILL'd build leaves: removed by the next build of the same cache
    monkeypatch.setattr(feature_cache, "write_shard", real_write)
    rebuilt = build_feature_cache(root, dataset, vision, batch_images=2, shard_bytes=1, progress=False)
    assert os.listdir(root) == [key] and os.path.isfile(os.path.join(root, key, INDEX_FILE))
    assert len(rebuilt.index["shards"]) == len(dataset) and rebuilt.index["images"] == len(dataset)
    with torch.no_grad():
        expected = vision(dataset[5]["pixel_values"])
    torch.testing.assert_close(rebuilt.features(5), expected, atol=1e-6, rtol=0)


def test_bad_images_are_recorded_and_skipped(tokenizer_dir, data_json, tmp_path):
    os.remove(os.path.join(os.path.dirname(data_json), "images", "0002.png"))
    dataset, vision = _dataset_and_vision(tokenizer_dir, data_json)
    with pytest.raises(ValueError, match="0002.png"):
        build_feature_cache(str(tmp_path / "strict"), dataset, vision, progress=False)
    dataset, vision = _dataset_and_vision(tokenizer_dir, data_json, skip_bad_samples=True)
    cache = build_feature_cache(str(tmp_path / "lenient"), dataset, vision, progress=False)
    assert cache.index["skipped"] == {"2": "image_load"}
    cached = CachedFeatureDataset(dataset, cache)
    assert cached[2] is None and cached[3] is not None
    assert dict(cached.skipped) == {"image_load": 1}


GRID_VISION = {"type": "module", "target": "torch.nn:Conv2d", "layout": "grid", "feature_dim": 24,
               "kwargs": {"in_channels": 3, "out_channels": 24, "kernel_size": 8, "stride": 8},
               "image_transform": {"size": [32, 32]}}


def test_grid_encoder_features_are_cached_and_train_as_pixels_do(tokenizer_dir, data_json, tmp_path):
    """A CNN's ``[B, C, h, w]`` read as ``[B, h*w, C]`` is a transposed, non-contiguous view (EfficientNet's
    too); safetensors refuses such tensors, so the cache crashed after encoding every sample."""
    def run(output: str, cache: str | None) -> list[float]:
        config = _run(tokenizer_dir, data_json, output, cache)
        config.model["vision"] = GRID_VISION
        return [record["loss"] for record in train(config, progress=False).history]

    tokens = torch.nn.Conv2d(3, 24, 8, 8)(torch.zeros(2, 3, 32, 32)).flatten(2).transpose(1, 2)
    assert not tokens.is_contiguous()
    plain = run(str(tmp_path / "plain"), None)
    cached = run(str(tmp_path / "cached"), str(tmp_path / "cache"))
    (key,) = os.listdir(tmp_path / "cache")
    assert os.path.isfile(tmp_path / "cache" / key / INDEX_FILE)
    # not bit for bit: the cache encodes up to 16 images per call, training 4 (another conv kernel may run)
    assert cached == pytest.approx(plain, rel=1e-5)

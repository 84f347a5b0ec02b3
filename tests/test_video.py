"""Video through the resampler: a clip's frames sampled at a rate, encoded per frame, read as one media with the
Perceiver's temporal embeddings — in training, from the feature cache, in generation and in evaluation."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from conftest import build_with_llm as build
from mmbridge.config import RunConfig
from mmbridge.data import DataConfig, MixtureDataset
from mmbridge.data.bridge_inputs import BridgeInputs
from mmbridge.eval.harness import run_suite
from mmbridge.testing import tiny_model_config
from mmbridge.train import train

GATED = {"type": "gated_xattn", "resampler": {"type": "perceiver", "num_latents": 4, "depth": 1, "heads": 4,
                                              "max_frames": 6}}
PERCEIVER = {"type": "perceiver", "num_latents": 4, "depth": 1, "heads": 4, "max_frames": 6}
VIDEO = {"miniworld": {"task": "video", "split": "train", "n": 2}}


def video_dataset(model, **processor) -> MixtureDataset:
    return MixtureDataset(DataConfig(sources=[VIDEO]), model.processor(**processor))


@pytest.mark.parametrize("bridge", [GATED, PERCEIVER], ids=["gated_xattn", "perceiver"])
def test_a_clip_is_one_media_of_sampled_frames(tokenizer_dir, bridge):
    model = build(tokenizer_dir, bridge)
    dataset = video_dataset(model)
    total = len(dataset.samples[0].images)
    assert dataset.samples[0].video and total >= 8
    example = dataset[0]
    assert int((example["input_ids"] == model.image_token_id).sum()) == model.tokens_per_image  # one media
    assert example["pixel_values"].shape[0] == 6 and example["bridge_inputs"].media_frames.tolist() == [[6]]
    assert dataset.processor.video_frames(total)[0] == 0 and dataset.processor.video_frames(total)[-1] == total - 1
    strided = video_dataset(model, video_stride=4)[0]  # every 4th frame: 0, 4, 8 (, 12)
    assert strided["bridge_inputs"].media_frames.tolist() == [[len(range(0, total, 4))]]


def test_frame_order_reaches_the_output_through_temporal_embeddings(tokenizer_dir):
    model = build(tokenizer_dir, PERCEIVER)
    frames = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    counts = BridgeInputs(media_frames=torch.tensor([[5]]))
    with torch.no_grad():
        forward = model.encode_images(frames, bridge_inputs=counts)
        backward = model.encode_images(frames.flip(0), bridge_inputs=counts)
        per_image = model.encode_images(frames)
    assert forward.shape == (1, 4, 32) and per_image.shape == (5, 4, 32)
    assert (forward - backward).abs().max() > 1e-4


def test_video_trains_generates_and_answers(tokenizer_dir, tmp_path):
    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir)) + 1
    stage = {"name": "video", "train": {"bridge": "full"}, "lr": 1e-2, "steps": 2, "batch_size": 2,
             "precision": "fp32"}
    run = RunConfig(model=tiny_model_config(tokenizer_dir, vocab, bridge=GATED), stages=[stage],
                    output_dir=str(tmp_path / "run"),
                    data={"sources": [VIDEO, {"miniworld": {"task": "attribute", "split": "train", "n": 2}}],
                          "max_length": 256, "video_stride": 2, "feature_cache": str(tmp_path / "cache")})
    model = train(run, progress=False).model
    seen = []
    generate = model.generate

    def recording(input_ids, attention_mask=None, pixel_values=None, **settings):
        seen.append((int((input_ids == model.image_token_id).sum()), settings["bridge_inputs"].media_frames.tolist()))
        return generate(input_ids, attention_mask, pixel_values, **settings)

    model.generate = recording
    results = run_suite(model, "miniworld", ["video"], n=2, progress=False)
    del model.generate
    assert results["tasks"]["video"]["n"] == 2
    assert seen == [(2, [[6], [6]])]  # one batch of two prompts, each one media of 6 frames
    processor = model.processor()
    frames = [image for image in video_frames(model)]
    inputs = processor.prompt_inputs("<image>" * len(frames) + "\nWhere does it move?", frames, video=True)
    settings = {"max_new_tokens": 5, "eos_token_id": [], "bridge_inputs": inputs["bridge_inputs"]}
    ids = inputs["input_ids"].unsqueeze(0)
    assert torch.equal(model.generate(ids, pixel_values=inputs["pixel_values"], **settings),
                       model.generate(ids, pixel_values=inputs["pixel_values"], use_cache=False, **settings))


def video_frames(model) -> list:
    from mmbridge.worlds.miniworld.sample import make_sample

    return make_sample("video", "test", 0)[1]

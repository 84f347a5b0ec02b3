"""Flamingo's gated cross-attention: φ masking, closed gates, several images per sample, keys/values once per
generate, one <image> token per image with the bridge's own marker embeddings, gate logging and the gate plot."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoTokenizer

from conftest import build_with_llm as build
from mmbridge.config import RunConfig
from mmbridge.testing import tiny_model_config, write_shape_dataset
from mmbridge.train import train

SPEC = {"type": "gated_xattn", "resampler": {"type": "perceiver", "num_latents": 4, "depth": 1, "heads": 4}}


def open_gates(model, attn: float = 0.7, dense: float = 0.3) -> None:
    with torch.no_grad():
        for block in model.bridge.blocks.values():
            block.alpha_attn.fill_(attn)
            block.alpha_ff.fill_(dense)


def two_image_row(model) -> torch.Tensor:
    """``[1, 10]``: text, <image>, text, <|endofchunk|>, <image>, text."""
    image, chunk = model.image_token_id, model.bridge.chunk_token_id
    return torch.tensor([[5, 6, image, 7, 8, chunk, image, 9, 10, 11]])


def block_output(model, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
    """What the block in front of layer 0 hands that layer (embeddings + gated cross-attention + FFW)."""
    seen = {}

    def capture(module, args, kwargs):
        seen["hidden"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

    handle = model.llm.decoder_layers()[0].register_forward_pre_hook(capture, with_kwargs=True)  # after the block's
    try:
        with torch.no_grad():
            model(input_ids, pixel_values=pixel_values)
    finally:
        handle.remove()
    return seen["hidden"][0]  # [L, D]


def test_layout_lets_each_token_read_the_last_image_before_it_or_every_earlier_one():
    from mmbridge.model.fusion.gated_xattn import GatedXAttnBridge, GatedXAttnConfig

    image_mask = torch.tensor([[0, 1, 0, 0, 1, 0], [1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    latents = torch.arange(3.0)[:, None, None].expand(3, 2, 4)  # 3 images × 2 latents; value = image number
    for attend, expected in (("last", [[0, 1, 1, 1, 2, 2], [1, 1, 1, 1, 1, 1]]),
                             ("all_previous", [[0, 1, 1, 1, 3, 3], [1, 1, 1, 1, 1, 1]])):
        bridge = GatedXAttnBridge(GatedXAttnConfig(attend=attend, resampler={"type": "linear"}), 4, 4)
        layout = bridge.phi_layout(latents, image_mask, image_mask.sum(-1))
        assert layout.latents.shape == (2, 2 * 2, 4)  # each row's images, padded to the most (2)
        assert layout.sees_image.tolist() == [[False, True, True, True, True, True], [True] * 6]
        readable = layout.allowed.view(2, 6, 2, 2).all(-1).long()  # per image slot
        images_read = (readable * torch.tensor([1, 2])).sum(-1) * layout.sees_image
        assert images_read.tolist() == expected  # last: slot number; all_previous: sum of slot numbers
    # a decoding step (no image in the call) keeps reading the prompt's last image
    bridge = GatedXAttnBridge(GatedXAttnConfig(resampler={"type": "linear"}), 4, 4)
    step = bridge.phi_layout(latents, torch.zeros(2, 1, dtype=torch.bool), torch.tensor([2, 1]))
    assert step.allowed.view(2, 1, 2, 2).all(-1).long().tolist() == [[[0, 1]], [[1, 0]]]


@pytest.mark.parametrize("attend", ["last", "all_previous"])
def test_tokens_read_only_the_images_phi_allows(tokenizer_dir, attend):
    model = build(tokenizer_dir, {**SPEC, "attend": attend, "layers": [0]})
    open_gates(model)
    ids = two_image_row(model)
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    other_first = pixels.clone()
    other_first[0] = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(2))
    before, after = block_output(model, ids, pixels), block_output(model, ids, other_first)
    changed = (before - after).abs().amax(-1) > 1e-6  # [L]
    first, second = 2, 6
    assert not changed[:first].any()  # before any image: nothing to read
    assert changed[first:second].all()  # the first image's chunk reads it
    assert changed[second:].all() == (attend == "all_previous")  # after the second image: only if all are read
    if attend == "last":
        assert not changed[second:].any()


def test_closed_gates_make_pixels_irrelevant(tokenizer_dir):
    model = build(tokenizer_dir, SPEC)
    ids = two_image_row(model)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        one = model(ids, pixel_values=torch.randn(2, 3, 16, 16, generator=generator)).logits
        other = model(ids, pixel_values=torch.randn(2, 3, 16, 16, generator=generator)).logits
    assert torch.equal(one, other)


def test_each_image_is_one_token_with_the_bridges_own_embedding(tokenizer_dir):
    model = build(tokenizer_dir, SPEC)
    assert model.tokens_per_image == 1
    table = model.llm.model.get_input_embeddings().weight  # the LLM's rows for the two tokens are never read:
    with torch.no_grad():
        table[model.image_token_id].fill_(100.0)
        table[model.bridge.chunk_token_id].fill_(100.0)
        embeds = model.embed(two_image_row(model), image_tokens=torch.zeros(2, 4, 32))
    markers = model.bridge.marker_embeddings.weight
    assert torch.equal(embeds[0, 2], markers[0]) and torch.equal(embeds[0, 6], markers[0])
    assert torch.equal(embeds[0, 5], markers[1])
    assert model.processor().tokens_per_image == 1


def test_image_count_mismatch_is_a_clear_error(tokenizer_dir):
    model = build(tokenizer_dir, SPEC)
    with pytest.raises(ValueError, match=r"hold 2 <image> token\(s\) but 1 image\(s\) were given"):
        model(two_image_row(model), pixel_values=torch.randn(1, 3, 16, 16))


def test_generation_reads_the_latents_keys_and_values_once_per_call(tokenizer_dir):
    model = build(tokenizer_dir, SPEC)
    open_gates(model)
    calls = []
    for block in model.bridge.blocks.values():
        block.k_proj.register_forward_hook(lambda *args: calls.append(1))
    ids = torch.cat([two_image_row(model)] * 2)
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = model.tokenizer.pad_token_id, 0  # left padding
    pixels = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    cached = model.generate(ids, mask, pixels, max_new_tokens=8, eos_token_id=[])
    assert len(calls) == len(model.bridge.blocks)  # once per block for the whole call, not per step
    assert torch.equal(cached, model.generate(ids, mask, pixels, max_new_tokens=8, eos_token_id=[], use_cache=False))
    assert torch.equal(cached[1:], model.generate(ids[1:, 2:], None, pixels[2:], max_new_tokens=8, eos_token_id=[]))


def test_training_logs_gates_every_step_and_plots_them_per_stage(tokenizer_dir, tmp_path):
    data = write_shape_dataset(str(tmp_path / "shapes"), 8, seed=1)
    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir)) + 1
    stages = [{"name": name, "train": {"bridge": "full"}, "lr": 5e-2, "steps": 3, "batch_size": 4,
               "precision": "fp32"} for name in ("first", "second")]
    run = RunConfig(model=tiny_model_config(tokenizer_dir, vocab, bridge=SPEC), stages=stages,
                    output_dir=str(tmp_path / "run"), data={"sources": [{"path": data}], "max_length": 128})
    model = train(run, progress=False).model
    with open(tmp_path / "run" / "log.jsonl") as handle:
        records = [json.loads(line) for line in handle]
    assert len(records) == 6 and all(record["gates"]["layers"] == [0, 1] for record in records)
    assert min(records[0]["gates"]["attn"]) > 0  # the first step already moved them off 0
    final = [float(torch.tanh(block.alpha_attn.detach()).abs()) for block in model.bridge.blocks.values()]
    assert records[-1]["gates"]["attn"] == pytest.approx(final, rel=1e-6)  # the log holds the values after the step
    for name in ("gates-1-first.png", "gates-2-second.png"):
        with open(tmp_path / "run" / name, "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n"


def test_few_shot_evaluation_runs_with_interleaved_images(tokenizer_dir):
    from mmbridge.eval.harness import run_suite

    model = build(tokenizer_dir, SPEC)
    open_gates(model)
    results = run_suite(model, "miniworld", ["attribute"], n=2, shots=2, progress=False)
    entry = results["tasks"]["attribute"]
    assert entry["n"] == 2 and entry["prompt_example"].count("<image>") == 3  # two shots' images and the query's

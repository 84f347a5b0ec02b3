"""Tests for mmbridge.generate: cache parity, left padding, EOS/min/max, sampling, streaming, chat.

One tiny random LLaVA-style model (CLIP 16 px → MLP → 2-layer Llama) is shared by the
module; tests that change weights work on a deep copy.

Greedy tokens are compared across code paths (cache or not, batched or solo), which run
different kernels. That holds on any CPU and thread count because the choices are far from
ties: the smallest top-1/top-2 logit gap along the cached single-prompt decode is 0.015,
against fp32 rounding differences of ~1e-7 at these logit scales (measured on AVX-512 and
AVX2 kernels).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from torch import nn

from mmbridge.generate import GenerationConfig, filter_top_k, filter_top_p, generate
from mmbridge.model.multimodal import MultimodalModel
from mmbridge.testing import shape_image, tiny_model_config, tiny_tokenizer

NO_EOS: dict[str, Any] = {"eos_token_id": []}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    directory = str(tmp_path_factory.mktemp("tokenizer"))
    tiny_tokenizer(directory)
    return directory


def build_model(tokenizer_dir: str, llm: dict | None = None) -> MultimodalModel:
    vocab_size = len(tiny_tokenizer(tokenizer_dir)) + 1
    torch.manual_seed(0)
    return MultimodalModel.from_config(tiny_model_config(tokenizer_dir, vocab_size, llm=llm)).eval()


@pytest.fixture(scope="module")
def model(tokenizer_dir: str) -> MultimodalModel:
    """Llama: rotary positions, which forgive a constant offset."""
    return build_model(tokenizer_dir)


@pytest.fixture(scope="module")
def gpt2_model(tokenizer_dir: str, model: MultimodalModel) -> MultimodalModel:
    """GPT-2: learned absolute positions, so wrong position ids for left-padded rows change the output."""
    hf_config = {"model_type": "gpt2", "vocab_size": model.llm.config.vocab_size, "n_embd": 32, "n_layer": 2,
                 "n_head": 4, "n_positions": 256, "bos_token_id": 3, "eos_token_id": 2, "initializer_range": 0.2}
    return build_model(tokenizer_dir, {"hf_config": hf_config})


def text_ids(model: MultimodalModel, text: str) -> list[int]:
    return model.tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_ids(model: MultimodalModel, *parts: str | None) -> torch.Tensor:
    """Concatenate text parts; ``None`` stands for one image (``tokens_per_image`` placeholders)."""
    ids: list[int] = []
    for part in parts:
        ids += [model.image_token_id] * model.tokens_per_image if part is None else text_ids(model, part)
    return torch.tensor(ids)  # [L]


def left_pad(rows: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack 1-D prompts into LEFT-padded ``input_ids`` and ``attention_mask`` ``[B, L]``."""
    length = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, length - len(row):] = row
        attention_mask[index, length - len(row):] = 1
    return input_ids, attention_mask


@pytest.fixture(scope="module")
def batch(model: MultimodalModel) -> dict[str, Any]:
    """Three prompts of different lengths with 1, 0 and 2 images; per-row pixel values kept for solo runs."""
    torch.manual_seed(1)
    rows = [prompt_ids(model, "What colour", None, "is it?"),
            prompt_ids(model, "Describe the picture in detail. There is one"),
            prompt_ids(model, "left", None, "right", None, "above?")]
    row_pixels = [torch.randn(1, 3, 16, 16), torch.randn(0, 3, 16, 16), torch.randn(2, 3, 16, 16)]
    input_ids, attention_mask = left_pad(rows, model.tokenizer.pad_token_id)
    return {"rows": rows, "row_pixels": row_pixels, "input_ids": input_ids, "attention_mask": attention_mask,
            "pixel_values": torch.cat(row_pixels)}


def eos_biased(model: MultimodalModel, token_id: int, bias: float = 1e4) -> MultimodalModel:
    """A copy of ``model`` whose LM head adds ``bias`` to ``token_id``'s logit (it becomes the argmax)."""
    biased = copy.deepcopy(model)
    head = biased.llm.lm_head
    new_head = nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        new_head.weight.copy_(head.weight)
        new_head.bias.zero_()
        new_head.bias[token_id] = bias
    biased.llm.model.lm_head = new_head
    return biased


# -- KV cache and batching ------------------------------------------------------------------------
def test_cache_matches_no_cache_single(model: MultimodalModel) -> None:
    input_ids = prompt_ids(model, "What colour", None, "is the shape?").unsqueeze(0)
    pixel_values = torch.randn(1, 3, 16, 16)
    cached = generate(model, input_ids, pixel_values=pixel_values, max_new_tokens=12, **NO_EOS)
    recomputed = generate(model, input_ids, pixel_values=pixel_values, max_new_tokens=12, use_cache=False,
                          **NO_EOS)
    assert cached.shape == (1, 12) and cached.dtype == torch.long
    assert torch.equal(cached, recomputed)


@pytest.mark.parametrize("model_name", ["model", "gpt2_model"])
def test_cache_matches_no_cache_left_padded_batch(model_name: str, batch: dict[str, Any],
                                                  request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(model_name)
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "pixel_values")}
    cached = generate(model, **inputs, max_new_tokens=10, **NO_EOS)
    recomputed = generate(model, **inputs, max_new_tokens=10, use_cache=False, **NO_EOS)
    assert cached.shape == (3, 10)
    assert torch.equal(cached, recomputed)


@pytest.mark.parametrize("model_name", ["model", "gpt2_model"])
def test_left_padded_rows_match_solo_prompts(model_name: str, batch: dict[str, Any],
                                             request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(model_name)
    batched = generate(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                       max_new_tokens=10, **NO_EOS)
    for index, (row, pixels) in enumerate(zip(batch["rows"], batch["row_pixels"])):
        solo = generate(model, row.unsqueeze(0), pixel_values=pixels if len(pixels) else None,
                        max_new_tokens=10, **NO_EOS)
        assert torch.equal(batched[index], solo[0]), f"row {index} differs from its solo run"
    if model_name == "gpt2_model":  # wide weights: its greedy tokens follow the pixels (the default-init Llama's
        # do not), so a row handed another row's image, or its images in another order, fails the check above
        for index, other_pixels in ((0, batch["row_pixels"][2][:1]), (2, batch["row_pixels"][2].flip(0))):
            moved = generate(model, batch["rows"][index].unsqueeze(0), pixel_values=other_pixels, max_new_tokens=10,
                             **NO_EOS)
            assert not torch.equal(moved[0], batched[index]), f"row {index}: the pixels do not change the answer"


def test_text_only_prompt(model: MultimodalModel) -> None:
    input_ids = prompt_ids(model, "Which shape is it? A").unsqueeze(0)
    cached = generate(model, input_ids, max_new_tokens=6, **NO_EOS)
    recomputed = generate(model, input_ids, max_new_tokens=6, use_cache=False, **NO_EOS)
    assert cached.shape == (1, 6)
    assert torch.equal(cached, recomputed)


def test_restores_training_flags_and_runs_without_grad(model: MultimodalModel) -> None:
    trained = copy.deepcopy(model).train()
    trained.vision.eval()  # a frozen part kept in eval by a training stage
    input_ids = prompt_ids(model, "yes no").unsqueeze(0)
    output = generate(trained, input_ids, max_new_tokens=3, **NO_EOS)
    assert trained.training and trained.llm.training and not trained.vision.training
    assert not output.requires_grad
    assert torch.equal(output, generate(model, input_ids, max_new_tokens=3, **NO_EOS))


# -- stopping -------------------------------------------------------------------------------------
def test_max_new_tokens_is_respected(model: MultimodalModel, batch: dict[str, Any]) -> None:
    for count in (0, 1, 7):
        output = generate(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                          max_new_tokens=count, **NO_EOS)
        assert output.shape == (3, count)


def test_stops_at_eos_and_pads_finished_rows(model: MultimodalModel, batch: dict[str, Any]) -> None:
    inputs = (batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    free = generate(model, *inputs, max_new_tokens=12, **NO_EOS)  # [3, 12]
    eos = int(free[0, 3])  # the token row 0 emits at step 3 acts as EOS
    pad = 5
    stopped = generate(model, *inputs, max_new_tokens=12, eos_token_id=eos, pad_token_id=pad)
    ends = [int((row == eos).nonzero()[0, 0]) + 1 if (row == eos).any() else 12 for row in free]
    assert stopped.shape == (3, max(ends))
    assert ends[0] <= 4 < max(ends)  # row 0 stops early while another runs on: its padding below is checked
    for index, end in enumerate(ends):
        assert torch.equal(stopped[index, :end], free[index, :end])
        assert (stopped[index, end:] == pad).all()


def test_forced_eos_and_min_new_tokens(model: MultimodalModel) -> None:
    eos = model.tokenizer.eos_token_id
    biased = eos_biased(model, eos)
    input_ids, attention_mask = left_pad([prompt_ids(model, "one two"), prompt_ids(model, "three four five six")],
                                         model.tokenizer.pad_token_id)
    immediate = generate(biased, input_ids, attention_mask, max_new_tokens=8)
    assert immediate.tolist() == [[eos], [eos]]
    delayed = generate(biased, input_ids, attention_mask, max_new_tokens=8, min_new_tokens=3)
    assert delayed.shape == (2, 4)
    assert (delayed[:, :3] != eos).all() and (delayed[:, 3] == eos).all()
    capped = generate(biased, input_ids, attention_mask, max_new_tokens=2, min_new_tokens=5)
    assert capped.shape == (2, 2) and (capped != eos).all()


def test_image_placeholder_is_never_generated(model: MultimodalModel) -> None:
    biased = eos_biased(model, model.image_token_id)
    input_ids = prompt_ids(model, "one two").unsqueeze(0)
    for use_cache in (True, False):
        output = generate(biased, input_ids, max_new_tokens=4, use_cache=use_cache, **NO_EOS)
        assert output.shape == (1, 4) and (output != model.image_token_id).all()


# -- sampling -------------------------------------------------------------------------------------
def test_sampling_is_reproducible_per_seed(model: MultimodalModel, batch: dict[str, Any]) -> None:
    inputs = (batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    settings = {"do_sample": True, "max_new_tokens": 10, **NO_EOS}
    first = generate(model, *inputs, seed=11, **settings)
    again = generate(model, *inputs, seed=11, **settings)
    other = generate(model, *inputs, seed=12, **settings)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    greedy = generate(model, *inputs, max_new_tokens=10, **NO_EOS)
    assert not torch.equal(first, greedy)


def test_degenerate_sampling_equals_greedy(model: MultimodalModel, batch: dict[str, Any]) -> None:
    inputs = (batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    greedy = generate(model, *inputs, max_new_tokens=8, **NO_EOS)
    for settings in ({"top_p": 1e-6}, {"top_k": 1}, {"temperature": 1e-4}):
        sampled = generate(model, *inputs, max_new_tokens=8, do_sample=True, seed=3, **settings, **NO_EOS)
        assert torch.equal(sampled, greedy), settings


def test_temperature_and_filters_sample_valid_tokens(model: MultimodalModel) -> None:
    input_ids = prompt_ids(model, "What colour").unsqueeze(0)
    config = GenerationConfig(max_new_tokens=6, do_sample=True, temperature=0.7, top_k=20, top_p=0.9, seed=0,
                              eos_token_id=[])
    output = generate(model, input_ids, generation_config=config)
    assert output.shape == (1, 6)
    assert ((output >= 0) & (output < model.llm.config.vocab_size)).all()
    assert torch.equal(output, generate(model, input_ids, generation_config=config))


def fixed_logits(model: MultimodalModel, logits: torch.Tensor) -> MultimodalModel:
    """A copy of ``model`` whose LM head gives ``logits`` ``[V]`` at every position (zero weights, that bias)."""
    fixed = eos_biased(model, 0, bias=0.0)
    with torch.no_grad():
        fixed.llm.lm_head.weight.zero_()
        fixed.llm.lm_head.bias.copy_(logits)
    return fixed


def test_temperature_top_k_and_top_p_act_together(model: MultimodalModel) -> None:
    """Temperature 0.7, top-k 20, top-p 0.9 on fixed logits: 4 strong tokens (logit 0), 16 medium ones (-3) and the
    rest (-3.1). Only all three filters in that order leave exactly the strong four; each alone would let more
    through (masses by hand below)."""
    vocab = model.llm.config.vocab_size
    strong, medium = list(range(50, 54)), list(range(60, 76))
    logits = torch.full((vocab,), -3.1)
    logits[strong], logits[medium] = 0.0, -3.0
    tail = vocab - len(strong) - len(medium) - 1  # the <image> token is never generated

    def strong_mass(temperature: float, kept_medium: int, kept_tail: int) -> float:
        weights = [len(strong), kept_medium * math.exp(-3.0 / temperature), kept_tail * math.exp(-3.1 / temperature)]
        return weights[0] / sum(weights)

    assert strong_mass(0.7, 16, 0) > 0.94  # top-20 at T = 0.7: the strong four hold top-p 0.9 with room to spare
    assert strong_mass(1.0, 16, 0) < 0.84  # without the temperature, medium tokens would enter the nucleus
    assert strong_mass(0.7, 16, tail) < 0.6  # without top-k, the tail would
    input_ids = prompt_ids(model, "What colour").unsqueeze(0).repeat(8, 1)
    config = GenerationConfig(max_new_tokens=50, do_sample=True, temperature=0.7, top_k=20, top_p=0.9, seed=0,
                              eos_token_id=[])
    sampled = generate(fixed_logits(model, logits), input_ids, generation_config=config)  # [8, 50]: 400 draws
    assert set(sampled.unique().tolist()) == set(strong)  # each strong token drawn (P(missing one) < 1e-40)


def test_top_p_keeps_smallest_nucleus() -> None:
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    kept = lambda top_p: torch.isfinite(filter_top_p(probs.log(), top_p))[0].tolist()  # noqa: E731
    assert kept(0.75) == [False, True, False, True]
    assert kept(0.85) == [True, True, False, True]
    assert kept(0.01) == [False, True, False, False]
    assert kept(1.0) == [True, True, True, True]


def test_top_k_keeps_k_largest() -> None:
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.5]])
    assert torch.isfinite(filter_top_k(logits, 2))[0].tolist() == [False, True, False, True]
    assert torch.equal(filter_top_k(logits, 0), logits)


def test_invalid_settings_raise(model: MultimodalModel) -> None:
    input_ids = prompt_ids(model, "yes").unsqueeze(0)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, input_ids, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, input_ids, top_p=0.0)
    with pytest.raises(ValueError, match="unknown generation setting"):
        generate(model, input_ids, max_length=3)


# -- streaming and chat ---------------------------------------------------------------------------
def test_streamer_receives_every_step(model: MultimodalModel, batch: dict[str, Any]) -> None:
    inputs = (batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    free = generate(model, *inputs, max_new_tokens=8, **NO_EOS)
    received: list[torch.Tensor] = []
    output = generate(model, *inputs, max_new_tokens=8, eos_token_id=int(free[1, 2]), streamer=received.append)
    assert all(tokens.shape == (3,) for tokens in received)
    assert len(received) == output.shape[1]
    assert torch.equal(torch.stack(received, dim=1), output)


def test_chat_decodes_new_tokens_until_eos(model: MultimodalModel, tmp_path: Any) -> None:
    path = tmp_path / "shape.png"
    shape_image("red", "circle", size=16).save(path)
    images = [shape_image("blue", "square", size=16), str(path)]
    processor = model.processor()
    input_ids = processor.prompt("What colour is it?", num_images=2).unsqueeze(0)
    assert int((input_ids == model.image_token_id).sum()) == 2 * model.tokens_per_image
    pixel_values = processor.encode_images(images)
    free = generate(model, input_ids, pixel_values=pixel_values, max_new_tokens=8, **NO_EOS)[0]
    eos = int(free[4])
    stop = int((free == eos).nonzero()[0, 0])
    answer = model.chat("What colour is it?", images, max_new_tokens=8, eos_token_id=eos)
    expected = model.tokenizer.decode(free[:stop].tolist(), skip_special_tokens=True).strip()
    assert isinstance(answer, str) and answer == expected


def test_chat_text_only_forced_eos_is_empty(model: MultimodalModel) -> None:
    biased = eos_biased(model, model.tokenizer.eos_token_id)
    assert biased.chat("Hello", max_new_tokens=5) == ""

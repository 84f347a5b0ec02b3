"""The output side (NExT-GPT): signal tokens whose rows are the output side's own (the LLM's matrices untouched),
their logits, forced runs while decoding, the output projection's alignment loss, training only the output key,
save/load, ``mmbridge info``."""

from __future__ import annotations

import os

import pytest
import torch

from conftest import image_prompt
from mmbridge.cli import info_text, main
from mmbridge.model.multimodal import MultimodalModel
from mmbridge.model.output.render import ImageSettings, run_conditioning
from mmbridge.model.output.side import l2_per_token
from mmbridge.testing import shape_image, tiny_diffusers_pipeline
from mmbridge.train import StageConfig, apply_stage

SMALL = {"signal_tokens": 4, "queries": 6, "width": 12, "hidden": 16, "encoder_layers": 1, "decoder_layers": 1,
         "heads": 2, "feed_forward": 32}
TEXT = [5, 6, 7, 8]


def _with_output(make_model, **fields) -> MultimodalModel:
    """The conftest's tiny model (same seed, same LLM and bridge weights) with an image output side."""
    return make_model(output={"image": {**SMALL, **fields}})


def _signal_ids(model: MultimodalModel) -> list[int]:
    return model.output.modalities["image"].token_ids


def _answer_with_run(model: MultimodalModel, runs: int = 1) -> torch.Tensor:
    """``text <image…> text [IMG0..3] text`` (``runs`` times the run) as ``[1, L]`` ids."""
    ids = image_prompt(model, TEXT)[0].tolist()
    for _ in range(runs):
        ids += _signal_ids(model) + [9, 10]
    return torch.tensor([ids])


def test_signal_tokens_are_added_and_the_llms_own_rows_stay(make_model):
    plain = make_model()
    model = _with_output(make_model)
    ids = _signal_ids(model)
    assert model.tokenizer.convert_ids_to_tokens(ids) == ["[IMG0]", "[IMG1]", "[IMG2]", "[IMG3]"]
    assert model.output_modalities == ("image",) and plain.output_modalities == ()
    vocab = plain.llm.model.get_input_embeddings().weight
    grown = model.llm.model.get_input_embeddings().weight
    assert torch.equal(grown[:vocab.shape[0]], vocab)  # every row the LLM had is untouched
    assert {name.split(".", 1)[0] for name, _ in model.named_parameters() if "output." in name or
            name.startswith("output")} == {"output"}


def test_signal_positions_read_the_output_sides_embeddings_and_head_rows(make_model):
    model = _with_output(make_model)
    with torch.no_grad():
        model.output.modalities["image"].embeddings.normal_()
        model.output.modalities["image"].head.normal_()
    ids = _answer_with_run(model)
    embeds = model.embed(ids, pixel_values=torch.randn(1, 3, 16, 16))
    positions = torch.isin(ids[0], torch.tensor(_signal_ids(model))).nonzero().flatten()
    assert torch.equal(embeds[0, positions], model.output.modalities["image"].embeddings)
    hidden = torch.randn(2, 3, model.llm.hidden_size)
    logits = model.token_logits(hidden)
    expected = hidden @ model.output.modalities["image"].head.T
    torch.testing.assert_close(logits[..., _signal_ids(model)], expected)
    plain_columns = [index for index in range(logits.shape[-1]) if index not in _signal_ids(model)]
    assert torch.equal(logits[..., plain_columns], model.llm.logits(hidden)[..., plain_columns])


def test_decoding_writes_a_started_run_to_its_end(make_model):
    model = _with_output(make_model)
    prompt, pixels = image_prompt(model, TEXT), torch.randn(1, 3, 16, 16)
    with torch.no_grad():  # every logit 0 but [IMG0]'s after the prompt: the run starts, and must then go on
        last = model(prompt, pixel_values=pixels, return_hidden=True).hidden[0, -1]
        model.llm.lm_head.weight.zero_()
        head = model.output.modalities["image"].head
        head.zero_()
        head[0] = 10 * last / last.norm()
    new = model.generate(prompt, pixel_values=pixels, max_new_tokens=6, eos_token_id=[])
    assert new[0, :4].tolist() == _signal_ids(model)  # chosen [IMG0], then forced [IMG1], [IMG2], [IMG3]
    assert new[0, 4].item() != _signal_ids(model)[1]  # after the run's last token nothing is forced
    free = model.generate(prompt, pixel_values=pixels, max_new_tokens=6, eos_token_id=[], use_cache=False)
    assert torch.equal(free, new)  # the same with the cache as without


def test_alignment_loss_is_the_per_token_l2_to_the_targets_and_trains_only_the_output_key(make_model):
    model = _with_output(make_model, align_weight=0.5)
    apply_stage(model, StageConfig(name="decoder", train={"output": "full"}, precision="fp32"), log=False)
    ids = _answer_with_run(model, runs=2)
    labels = ids.clone()
    labels[:, :len(TEXT) + model.tokens_per_image] = -100
    targets = torch.randn(2, SMALL["queries"], SMALL["width"], generator=torch.Generator().manual_seed(3))
    pixels = torch.randn(1, 3, 16, 16)
    output = model(ids, pixel_values=pixels, labels=labels, output_targets={"image": targets}, return_hidden=True)
    embeds = model.embed(ids, pixel_values=pixels)
    runs = model.output.modalities["image"].runs(ids)
    assert runs == [(0, len(TEXT) + model.tokens_per_image + 4), (0, len(TEXT) + model.tokens_per_image + 10)]
    predicted = model.output.modalities["image"].conditioning(output.hidden, embeds, runs)
    by_hand = (predicted - targets).pow(2).sum(-1).sqrt().mean()  # a distance per token, averaged: not squared
    torch.testing.assert_close(output.aux_losses["image_align"], 0.5 * by_hand)
    torch.testing.assert_close(l2_per_token(predicted, targets), by_hand)
    assert "image_align" in output.aux_losses and output.loss > output.aux_losses["image_align"]
    output.loss.backward()
    grads = {name.split(".", 1)[0] for name, parameter in model.named_parameters() if parameter.grad is not None}
    assert grads == {"output"}
    projection = model.output.modalities["image"].projection
    assert projection.queries.grad.abs().sum() > 0 and model.output.modalities["image"].head.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="holds 2 complete image signal-token run.* but 1 caption target"):
        model(ids, pixel_values=pixels, labels=labels, output_targets={"image": targets[:1]})


def test_run_conditioning_reads_each_complete_run_and_skips_a_cut_one(make_model):
    model = _with_output(make_model)
    ids = _answer_with_run(model, runs=2)
    cut = torch.cat([ids, torch.tensor([_signal_ids(model)[:2]])], dim=1)  # a third run, cut after 2 tokens
    found = run_conditioning(model, cut, torch.ones_like(cut), model.encode_images(torch.randn(1, 3, 16, 16)))
    assert [row for row, _ in found["image"]] == [0, 0]
    assert found["image"][0][1].shape == (SMALL["queries"], SMALL["width"])
    assert not torch.allclose(found["image"][0][1], found["image"][1][1])  # the runs stand in different places


def test_save_and_load_keep_the_output_side(make_model, tmp_path):
    model = _with_output(make_model)
    with torch.no_grad():
        for parameter in model.output.parameters():
            parameter.add_(0.1)
    model.save_pretrained(str(tmp_path / "model"))
    reloaded = MultimodalModel.from_pretrained(str(tmp_path / "model"))
    assert _signal_ids(reloaded) == _signal_ids(model)
    ids = _answer_with_run(model)
    pixels = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(reloaded(ids, pixel_values=pixels).logits, model(ids, pixel_values=pixels).logits)
    text = info_text(reloaded)
    assert "output image: 4 signal tokens '[IMG0][IMG1][IMG2][IMG3]'" in text and "output " in text


def test_bad_output_configs_name_the_field(make_model):
    with pytest.raises(ValueError, match="output modality 'sound' is not supported; supported: \\['image'\\]"):
        make_model(output={"sound": {}})
    with pytest.raises(ValueError, match=r"output.image: unknown field\(s\) \['querys'\]"):
        make_model(output={"image": {"querys": 4}})
    with pytest.raises(ValueError, match="output: signal_tokens must be >= 1, got 0"):
        make_model(output={"image": {**SMALL, "signal_tokens": 0}})


# -- with a generator (a tiny random diffusers pipeline: conditioning 16 × 32) ---------------------------------
@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory) -> str:
    return tiny_diffusers_pipeline(str(tmp_path_factory.mktemp("pipeline")), condition_length=16)


def _drawing_model(make_model, pipeline_dir: str, **fields) -> MultimodalModel:
    spec = {**SMALL, "queries": 16, "width": 32, "generator": {"type": "diffusers", "path": pipeline_dir}, **fields}
    return make_model(output={"image": spec})


def _start_a_run(model: MultimodalModel, prompt: torch.Tensor, pixels: torch.Tensor) -> None:
    """Every logit 0 but [IMG0]'s after ``prompt``, as in test_decoding_writes_a_started_run_to_its_end."""
    with torch.no_grad():
        last = model(prompt, pixel_values=pixels, return_hidden=True).hidden[0, -1]
        model.llm.lm_head.weight.zero_()
        model.output.modalities["image"].head.zero_()
        model.output.modalities["image"].head[0] = 10 * last / last.norm()


def test_the_generators_conditioning_shape_is_checked_at_build(make_model, pipeline_dir):
    with pytest.raises(ValueError, match=r"\[16, 12\].*\[16, 32\]|\[16, 32\].*\[16, 12\]"):
        _drawing_model(make_model, pipeline_dir, width=12)
    model = _drawing_model(make_model, pipeline_dir)
    assert model.output.modalities["image"].generator.condition_width == 32
    assert "generator diffusers" in info_text(model)


def test_captions_become_the_generators_own_encodings_as_targets(make_model, pipeline_dir):
    model = _drawing_model(make_model, pipeline_dir)
    ids = _answer_with_run(model, runs=2)
    labels = ids.clone()
    labels[:, :len(TEXT) + model.tokens_per_image] = -100
    pixels = torch.randn(1, 3, 16, 16)
    captions = ["a red circle", "two blue squares"]
    generator = model.output.modalities["image"].generator
    by_captions = model(ids, pixel_values=pixels, labels=labels, output_captions={"image": captions})
    by_targets = model(ids, pixel_values=pixels, labels=labels,
                       output_targets={"image": generator.encode_text(captions).embeds})
    assert torch.equal(by_captions.aux_losses["image_align"], by_targets.aux_losses["image_align"])
    other = model(ids, pixel_values=pixels, labels=labels, output_captions={"image": captions[::-1]})
    assert not torch.equal(other.aux_losses["image_align"], by_captions.aux_losses["image_align"])


def test_generate_and_chat_draw_one_image_per_run(make_model, pipeline_dir, tmp_path):
    model = _drawing_model(make_model, pipeline_dir)
    prompt, pixels = image_prompt(model, TEXT), torch.randn(1, 3, 16, 16)
    _start_a_run(model, prompt, pixels)
    settings = ImageSettings(steps=2, seed=5)
    result = model.generate(prompt, pixel_values=pixels, max_new_tokens=5, eos_token_id=[], return_media=True,
                            image_settings=settings)
    assert result.sequences[0, :4].tolist() == _signal_ids(model) and len(result.images[0]) == 1
    image = result.images[0][0]
    assert image.size == (16, 16) and image.mode == "RGB"
    again = model.generate(prompt, pixel_values=pixels, max_new_tokens=5, eos_token_id=[], return_media=True,
                           image_settings=settings).images[0][0]
    assert again.tobytes() == image.tobytes()  # the same seed draws the same image
    other = model.generate(prompt, pixel_values=pixels, max_new_tokens=5, eos_token_id=[], return_media=True,
                           image_settings=ImageSettings(steps=2, seed=6)).images[0][0]
    assert other.tobytes() != image.tobytes()
    answer = model.chat("Draw it.", [shape_image("red", "circle", 16)], return_media=True, max_new_tokens=5,
                        eos_token_id=[], image_settings=settings)
    assert isinstance(answer.text, str) and len(answer.images) == 1
    assert model.generate(prompt, pixel_values=pixels, max_new_tokens=3, eos_token_id=[],  # a run cut short
                          return_media=True, image_settings=settings).images == [[]]


def test_saved_model_reloads_its_generator_and_the_cli_writes_the_images(make_model, pipeline_dir, tmp_path, capsys):
    model = _drawing_model(make_model, pipeline_dir)
    prompt, pixels = image_prompt(model, TEXT), torch.randn(1, 3, 16, 16)
    _start_a_run(model, prompt, pixels)
    model.save_pretrained(str(tmp_path / "model"))
    reloaded = MultimodalModel.from_pretrained(str(tmp_path / "model"))
    assert reloaded.export_config().output["image"]["generator"]["path"] == os.path.abspath(pipeline_dir)
    image_path = str(tmp_path / "input.png")
    shape_image("red", "circle", 16).save(image_path)
    arguments = ["generate", "--model", str(tmp_path / "model"), "--image", image_path, "--prompt", "Draw it.",
                 "--max-new-tokens", "5", "--out", str(tmp_path / "drawn"), "--image-steps", "2", "--image-seed", "1"]
    assert main(arguments) == 0
    assert (tmp_path / "drawn" / "image-1.png").is_file()
    assert f"image 1: {tmp_path / 'drawn' / 'image-1.png'}" in capsys.readouterr().out
    plain = make_model()
    plain.save_pretrained(str(tmp_path / "plain"))
    assert main(["generate", "--model", str(tmp_path / "plain"), "--prompt", "Hi", "--out", str(tmp_path / "x")]) == 2
    assert "answers with text only" in capsys.readouterr().err


# -- data: MiniWorld's text_to_image requests ---------------------------------------------------------------------
def test_the_processor_writes_each_marker_as_a_run_and_carries_its_caption(make_model, pipeline_dir):
    from mmbridge.data import collate
    from mmbridge.data.processor import SampleError
    from mmbridge.worlds.miniworld.stream import load_samples

    samples = load_samples({"task": "text_to_image", "split": "train", "n": 3})
    model = _drawing_model(make_model, pipeline_dir)
    processor = model.processor()
    example = processor(samples[0])
    ids, labels = example["input_ids"].tolist(), example["labels"].tolist()
    start = ids.index(_signal_ids(model)[0])
    assert ids[start:start + 4] == _signal_ids(model) and labels[start:start + 4] == _signal_ids(model)  # targets
    assert example["output_captions"] == {"image": [samples[0].outputs[0]["caption"]]}
    batch = collate([processor(sample) for sample in samples], processor.pad_token_id)
    assert batch["output_captions"]["image"] == [sample.outputs[0]["caption"] for sample in samples]
    output = model(**{key: value for key, value in batch.items() if key != "ids"}, return_logits="none")
    assert output.aux_losses["image_align"] > 0
    with pytest.raises(SampleError, match="answers with image .<image_out>. but the model has no image output side"):
        make_model().processor()(samples[0])
    with pytest.raises(SampleError, match="1 output.* but 0 complete run"):
        model.processor(max_length=len(ids) - 6)(samples[0])  # truncation cuts the run


def test_training_only_the_output_key_lowers_the_alignment_loss(tokenizer_dir, pipeline_dir, tmp_path):
    from transformers import AutoTokenizer

    from mmbridge.config import RunConfig
    from mmbridge.testing import tiny_model_config
    from mmbridge.train import train

    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir)) + 1
    output = {"image": {**SMALL, "queries": 16, "width": 32, "generator": {"type": "diffusers", "path": pipeline_dir}}}
    data = {"sources": [{"miniworld": {"task": "text_to_image", "split": "train", "n": 8}}], "max_length": 160}
    stage = {"name": "decoder_side", "train": {"output": "full"}, "lr": 3e-3, "steps": 16, "batch_size": 4,
             "precision": "fp32", "warmup_ratio": 0.0, "schedule": "constant"}
    run = RunConfig(model=tiny_model_config(tokenizer_dir, vocab, output=output), stages=[stage], data=data,
                    output_dir=str(tmp_path / "run"), seed=0)
    result = train(run, progress=False)
    aligned = [record["aux_losses"]["image_align"] for record in result.history]
    assert sum(aligned[-4:]) < 0.8 * sum(aligned[:4])  # the same 8 requests, seen twice each: the l2 falls
    trained = {name.split(".", 1)[0] for name, parameter in result.model.named_parameters() if parameter.requires_grad}
    assert trained == {"output"}


def test_a_caption_the_generator_truncates_is_said_once(make_model, pipeline_dir, caplog):
    model = _drawing_model(make_model, pipeline_dir)
    long = "a large red circle in the top left and a small blue square in the bottom right of a white canvas"
    with caplog.at_level("WARNING", logger="mmbridge"):
        model.output.targets({"image": [long, "a red circle"]}, None)
        model.output.targets({"image": [long]}, None)
    said = [record.message for record in caplog.records if "truncated" in record.message]
    assert len(said) == 1 and "keeps 16 tokens" in said[0] and long[:20] in said[0]
    assert not [record for record in caplog.records if "CLIP can only handle" in record.message]

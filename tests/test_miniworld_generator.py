"""The MiniWorld generator (issue 24 part 3): the objective ``denoising`` in the main trainer, the frozen pixel VAE,
and ``final/`` as a StableDiffusionPipeline directory that diffusers and mmbridge's diffusers generator load.

Tiny parts: the tiny BERT of the ``bert_dir`` fixture as the text encoder (16 tokens of width 32), a two-block
UNet (16 and 32 channels, cross-attention in the inner block) on 16 px MiniWorld caption samples.
"""

from __future__ import annotations

import os
import signal

import pytest
import torch
from diffusers import StableDiffusionPipeline

from mmbridge.config import RunConfig, load_run_config
from mmbridge.data import ImageLoadError, SampleError, collate
from mmbridge.train import apply_stage, train
from mmbridge.train.denoising import GeneratorModel, build_generator_model, generation_caption, parse_generator_spec
from mmbridge.train.interrupt import TrainingInterrupted
from mmbridge.train.objectives import StageObjective
from mmbridge.train.pixel_vae import pixel_vae
from mmbridge.train.preflight import check_run, parse_stage
from mmbridge.train.qformer_pretrain import check_captions
from mmbridge.utils import seed_everything

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")
LENGTH = 16  # conditioning tokens
SIZE = 16  # pixels


def _model_spec(bert_dir: str, **noise) -> dict:
    return {"vision": {"type": "pixels", "image_size": SIZE},
            "bridge": {"type": "unet", "channels": [16, 32], "cross_attention": [False, True], "attention_heads": 2,
                       "norm_groups": 8},
            "llm": {"init_from": bert_dir, "max_length": LENGTH},
            "noise": {"timesteps": 100, "caption_dropout": 0.1, **noise}}


def _run(bert_dir: str, output: str, steps: int = 6, **stage) -> RunConfig:
    settings = {"name": "denoise", "objective": "denoising", "train": {"bridge": "full"}, "lr": 3e-3, "steps": steps,
                "batch_size": 8, "precision": "fp32", "warmup_ratio": 0.0, "schedule": "constant", **stage}
    return RunConfig(model=_model_spec(bert_dir), stages=[settings], output_dir=output, seed=0,
                     data={"sources": [{"miniworld": {"task": "caption", "split": "train", "n": 32}}]})


def _fresh_model(run: RunConfig) -> GeneratorModel:
    seed_everything(run.seed)  # as train() seeds before it builds
    return build_generator_model(run.model)


def _evaluation_batch(model: GeneratorModel, count: int = 16, repeats: int = 4) -> dict:
    """``count`` training samples, each at ``repeats`` fixed timesteps with fixed noise (a seeded generator)."""
    from mmbridge.data import DataConfig, MixtureDataset

    data = DataConfig(sources=[{"miniworld": {"task": "caption", "split": "train", "n": 32}}])
    batch = collate([MixtureDataset(data, model.processor())[index] for index in range(count)],
                    int(model.tokenizer.pad_token_id))
    generator = torch.Generator().manual_seed(123)
    pixels = batch["pixel_values"].repeat(repeats, 1, 1, 1)
    return {"pixel_values": pixels, "input_ids": batch["input_ids"].repeat(repeats, 1),
            "attention_mask": batch["attention_mask"].repeat(repeats, 1),
            "noise": torch.randn(pixels.shape, generator=generator),
            "timesteps": torch.randint(0, model.scheduler.config.num_train_timesteps, (len(pixels),),
                                       generator=generator)}


def _data_loss(model: GeneratorModel, batch: dict) -> float:
    """The denoising loss of the whole evaluation batch (no caption dropped), without autograd."""
    with torch.no_grad():
        return float(model.denoising_loss(**batch))


def _same_weights(model: torch.nn.Module, reference: torch.nn.Module) -> None:
    expected = reference.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


# -- what it trains on -------------------------------------------------------------------------------------
def _requests(task: str = "text_to_image", n: int = 3) -> list:
    from mmbridge.worlds.miniworld.stream import load_samples

    return load_samples({"task": task, "split": "train", "n": n})


def _pixels(model: GeneratorModel, images: list) -> torch.Tensor:
    return model.processor().pixel_values(images)


def test_a_request_trains_on_its_output_target_and_caption_not_its_prompt(bert_dir):
    from mmbridge.worlds.miniworld.generation import output_images

    model = build_generator_model(_model_spec(bert_dir))
    processor = model.processor()
    for sample in _requests("text_to_image") + _requests("image_edit", 2):
        caption = sample.outputs[0]["caption"]
        example = processor(sample)
        expected = model.tokenizer(caption, truncation=True, max_length=LENGTH)["input_ids"]
        assert example["input_ids"].tolist() == expected
        request = next(turn["content"] for turn in sample.conversation if turn["role"] == "user")
        assert model.tokenizer.decode(expected, skip_special_tokens=True) != \
            model.tokenizer.decode(model.tokenizer(request)["input_ids"], skip_special_tokens=True)
        target = _pixels(model, output_images(sample.outputs))
        assert example["pixel_values"].shape == (1, 3, SIZE, SIZE)
        assert torch.equal(example["pixel_values"], target)
        if sample.images:  # an edit's input image is not what it trains on
            assert not torch.equal(example["pixel_values"], _pixels(model, sample.image_loader()))


def test_a_written_request_trains_on_its_output_file(bert_dir, tmp_path):
    from mmbridge.data.formats.llava import load_llava_json
    from mmbridge.worlds.miniworld.writer import write_task

    model = build_generator_model(_model_spec(bert_dir))
    samples = load_llava_json(write_task("text_to_image", "train", 2, str(tmp_path), progress=False))
    streamed = _requests("text_to_image", 2)
    for written, same in zip(samples, streamed):
        assert written.output_loader is None and os.path.isfile(written.outputs[0]["image"])
        example, expected = model.processor()(written), model.processor()(same)
        assert torch.equal(example["input_ids"], expected["input_ids"])
        assert torch.equal(example["pixel_values"], expected["pixel_values"])  # the PNG holds the drawn pixels
    os.remove(samples[0].outputs[0]["image"])
    with pytest.raises(ImageLoadError, match="file not found"):
        model.processor()(samples[0])


def test_a_sample_without_outputs_trains_on_its_image_and_reply(bert_dir):
    from mmbridge.worlds.miniworld.stream import load_samples

    model = build_generator_model(_model_spec(bert_dir))
    for sample in load_samples({"task": "caption", "split": "train", "n": 3}):
        assert sample.outputs is None
        example = model.processor()(sample)
        reply = next(turn["content"] for turn in sample.conversation if turn["role"] == "assistant")
        assert example["input_ids"].tolist() == model.tokenizer(reply, truncation=True, max_length=LENGTH)["input_ids"]
        assert torch.equal(example["pixel_values"], _pixels(model, sample.image_loader()))


def test_requests_it_cannot_train_on_are_named(bert_dir):
    import dataclasses

    model = build_generator_model(_model_spec(bert_dir))
    sample = _requests(n=1)[0]
    nothing = dataclasses.replace(sample, output_loader=None)  # no file, nothing to draw with
    with pytest.raises(SampleError, match=r"outputs\[0\] names no target image file"):
        model.processor()(nothing)
    twice = dataclasses.replace(sample, outputs=sample.outputs * 2)
    with pytest.raises(SampleError, match="answers with 2 images"):
        model.processor()(twice)
    with pytest.raises(ValueError, match=r"stage 'denoise'.*1 sample\(s\) are not: .*output_count"):
        check_captions([sample, twice], "stage 'denoise'", "denoising", generation_caption)


def test_min_snr_weights_the_loss_per_timestep(bert_dir):
    model = build_generator_model(_model_spec(bert_dir))
    batch = _evaluation_batch(model, count=4, repeats=2)
    with torch.no_grad():
        weighted = float(model.denoising_loss(**batch))
        clean = model.latents(batch["pixel_values"])
        noisy = model.scheduler.add_noise(clean, batch["noise"], batch["timesteps"])
        predicted = model.bridge(noisy, batch["timesteps"], model.conditioning(batch["input_ids"],
                                                                               batch["attention_mask"]))
    errors = ((predicted - batch["noise"]) ** 2).mean(dim=(1, 2, 3))  # [B]
    alphas = model.scheduler.alphas_cumprod[batch["timesteps"]]
    weights = torch.clamp(5.0 * (1 - alphas) / alphas, max=1.0)  # min(snr, 5) / snr
    assert weights.min() < 0.5 and weights.max() == 1.0  # the batch holds both kinds of timestep
    assert abs(weighted - float((weights * errors).mean())) < 1e-5 * float(errors.mean())
    model.spec.noise.min_snr_gamma = 0.0
    with torch.no_grad():
        assert abs(float(model.denoising_loss(**batch)) - float(errors.mean())) < 1e-5 * float(errors.mean())


# -- the pixel VAE ----------------------------------------------------------------------------------------
def test_pixel_vae_latents_are_the_pixels():
    vae = pixel_vae(16)
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    images[0] = 1.0  # the extremes too
    images[1] = -1.0
    with torch.no_grad():
        posterior = vae.encode(images).latent_dist
        decoded = vae.decode(posterior.sample()).sample
    assert vae.config.scaling_factor == 1.0 and posterior.mean.shape == images.shape
    torch.testing.assert_close(posterior.mean, images, atol=2e-6, rtol=0)
    torch.testing.assert_close(decoded, images, atol=5e-6, rtol=0)
    assert not any(parameter.requires_grad for parameter in vae.parameters())


# -- training --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(bert_dir, tmp_path_factory):
    """40 steps of the tiny recipe, and the loss of a fixed evaluation batch before and after."""
    run = _run(bert_dir, str(tmp_path_factory.mktemp("trained")), steps=40)
    fresh = _fresh_model(run)
    batch = _evaluation_batch(fresh)
    before = _data_loss(fresh, batch)
    result = train(run, progress=False)
    return run, result, before, _data_loss(result.model, batch)


def test_loss_falls_on_a_fixed_evaluation_batch(trained):
    run, result, before, after = trained
    assert len(result.history) == 40 and all(record["label_tokens"] == 8 for record in result.history)
    assert after < 0.5 * before, (before, after)  # a fresh UNet's noise guess is far off; 40 steps halve it at least


def test_final_is_a_stable_diffusion_pipeline_that_draws(trained):
    run, result, _, _ = trained
    final = os.path.join(run.output_dir, "final")
    pipeline = StableDiffusionPipeline.from_pretrained(final, local_files_only=True)
    assert pipeline.tokenizer.model_max_length == LENGTH and pipeline.safety_checker is None
    assert pipeline.unet.config.sample_size * pipeline.vae_scale_factor == SIZE
    _same_weights(pipeline.unet, result.model.bridge.unet)
    caption = "a red circle ."
    ids = result.model.tokenizer([caption], return_tensors="pt")
    with torch.no_grad():
        trained_on = result.model.conditioning(ids["input_ids"], ids["attention_mask"])  # what training conditions on
        embeds, _ = pipeline.encode_prompt([caption], "cpu", 1, False)
        empty, _ = pipeline.encode_prompt([""], "cpu", 1, False)
        dropped = result.model.conditioning(result.model.empty_ids[None], result.model.empty_mask[None])
    assert embeds.shape == (1, LENGTH, 32)
    torch.testing.assert_close(embeds, trained_on)
    torch.testing.assert_close(empty, dropped)  # a dropped caption trains as the pipeline's negative prompt
    generator = torch.Generator().manual_seed(0)
    image = pipeline(prompt_embeds=embeds, negative_prompt_embeds=empty, guidance_scale=3.0, num_inference_steps=4,
                     generator=generator, output_type="np").images
    assert image.shape == (1, SIZE, SIZE, 3) and 0.0 <= image.min() and image.max() <= 1.0
    assert pipeline(prompt=[caption], num_inference_steps=2, output_type="np").images.shape == (1, SIZE, SIZE, 3)


def test_mmbridge_diffusers_generator_reads_final(trained):
    from mmbridge.model.generators import build_generator

    run, result, _, _ = trained
    generator = build_generator({"type": "diffusers", "path": os.path.join(run.output_dir, "final")})
    assert (generator.condition_length, generator.condition_width) == (LENGTH, 32)
    conditioning = generator.encode_text(["a red circle ."])
    images = generator.generate(conditioning.embeds, steps=2, seed=0)
    assert images[0].size == (SIZE, SIZE)


def test_only_the_unet_gets_gradients(bert_dir, tmp_path):
    run = _run(bert_dir, str(tmp_path))
    model = _fresh_model(run)
    apply_stage(model, parse_stage(run.stages[0], 0), log=False)
    batch = _evaluation_batch(model, count=8, repeats=1)
    loss, images, _ = StageObjective(model, "denoising")({key: batch[key] for key in
                                                          ("pixel_values", "input_ids", "attention_mask")})
    loss.backward()
    assert images == 8
    for name, parameter in model.named_parameters():
        if name.startswith("bridge."):
            assert parameter.requires_grad and parameter.grad is not None, name
        else:
            assert not parameter.requires_grad and parameter.grad is None, name
    assert sum(parameter.grad.abs().sum() > 0 for parameter in model.bridge.parameters()) > 0.9 * len(
        list(model.bridge.parameters()))
    assert not list(model.output.parameters())


def test_captions_drop_to_the_empty_prompt_at_the_set_rate(bert_dir):
    model = build_generator_model(_model_spec(bert_dir, caption_dropout=0.5))
    ids = model.tokenizer(["a red circle ."] * 400, return_tensors="pt")
    torch.manual_seed(0)
    dropped_ids, dropped_mask = model._drop_captions(ids["input_ids"], ids["attention_mask"])
    empty = (dropped_ids == model.empty_ids).all(dim=1)  # [400]
    assert 140 < int(empty.sum()) < 260  # Binomial(400, 0.5): 200 ± 30 at 3 sigma
    assert torch.equal(dropped_mask[empty], model.empty_mask.expand(int(empty.sum()), -1))
    kept = dropped_ids[~empty, :ids["input_ids"].shape[1]]
    assert torch.equal(kept, ids["input_ids"][~empty])
    never = build_generator_model(_model_spec(bert_dir, caption_dropout=0.0))
    assert not (never._drop_captions(ids["input_ids"], ids["attention_mask"])[0] == never.empty_ids).all(1).any()


# -- what the trainer gives it -------------------------------------------------------------------------
@pytest.mark.skipif(not hasattr(signal, "raise_signal"), reason="needs signal.raise_signal")
def test_ctrl_c_then_resume_equals_an_uninterrupted_run(bert_dir, tmp_path):
    whole = train(_run(bert_dir, str(tmp_path / "whole")), progress=False)

    def press_ctrl_c(record: dict) -> None:
        if record["global_step"] == 3:
            signal.raise_signal(signal.SIGINT)

    with pytest.raises(TrainingInterrupted, match=r"stopped at step 3 of 6 of stage 'denoise'"):
        train(_run(bert_dir, str(tmp_path / "stopped")), progress=False, on_step=press_ctrl_c)
    resumed = train(_run(bert_dir, str(tmp_path / "stopped")), resume=True, progress=False)
    assert [record["loss"] for record in resumed.history] == [record["loss"] for record in whole.history]
    _same_weights(resumed.model, whole.model)
    assert len({record["loss"] for record in whole.history}) == 6  # every step drew its own noise
    stopped = StableDiffusionPipeline.from_pretrained(str(tmp_path / "stopped" / "final"), local_files_only=True)
    _same_weights(stopped.unet, whole.model.bridge.unet)


def _ema_run(bert_dir: str, output: str) -> RunConfig:
    run = _run(bert_dir, output)
    run.model["bridge"]["ema_decay"] = 0.9
    return run


def test_the_moving_average_follows_each_step_and_is_what_final_holds(bert_dir, tmp_path):
    run = _ema_run(bert_dir, str(tmp_path / "run"))
    model = _fresh_model(run)
    average = [parameter.detach().clone() for parameter in model.bridge.unet.parameters()]  # starts at the init

    def follow(record: dict) -> None:  # the hand-written average of the weights after each step
        step = record["global_step"] - 1
        decay = min(0.9, (1 + step) / (10 + step))
        for mean, weight in zip(average, model.bridge.unet.parameters()):
            mean.mul_(decay).add_(weight.detach(), alpha=1 - decay)

    result = train(run, progress=False, on_step=follow, model=model)
    ema = list(result.model.bridge.ema.parameters())
    assert not any(parameter.requires_grad for parameter in ema)
    for mean, kept in zip(average, ema):
        torch.testing.assert_close(kept, mean, atol=1e-6, rtol=1e-5)
    assert any(not torch.equal(kept, weight) for kept, weight in zip(ema, result.model.bridge.unet.parameters()))
    final = StableDiffusionPipeline.from_pretrained(os.path.join(run.output_dir, "final"), local_files_only=True)
    _same_weights(final.unet, result.model.bridge.ema)


@pytest.mark.skipif(not hasattr(signal, "raise_signal"), reason="needs signal.raise_signal")
def test_ctrl_c_then_resume_restores_the_moving_average(bert_dir, tmp_path):
    whole = train(_ema_run(bert_dir, str(tmp_path / "whole")), progress=False)

    def press_ctrl_c(record: dict) -> None:
        if record["global_step"] == 3:
            signal.raise_signal(signal.SIGINT)

    with pytest.raises(TrainingInterrupted):
        train(_ema_run(bert_dir, str(tmp_path / "stopped")), progress=False, on_step=press_ctrl_c)
    resumed = train(_ema_run(bert_dir, str(tmp_path / "stopped")), resume=True, progress=False)
    _same_weights(resumed.model, whole.model)  # the average included
    stopped = StableDiffusionPipeline.from_pretrained(str(tmp_path / "stopped" / "final"), local_files_only=True)
    _same_weights(stopped.unet, whole.model.bridge.ema)


# -- preflight -------------------------------------------------------------------------------------------
def test_the_shipped_recipe_passes_preflight():
    run = load_run_config(os.path.join(CONFIGS, "miniworld_generator.yaml"))
    stages = check_run(run)
    assert [stage.objective for stage in stages] == ["denoising"]
    spec = parse_generator_spec(run.model)
    assert spec.llm.init_from == "minilm" and spec.vision.type == "pixels"


@pytest.mark.parametrize("change, message", [
    (lambda run: run.stages.append({**run.stages[0], "name": "chat", "objective": "lm"}),
     r"stages.1 \('chat'\) has objective 'lm' but stages.0 \('denoise'\) trains 'denoising'"),
    (lambda run: run.stages[0].update(train={"bridge": "full", "llm": "full"}),
     r"frozen llm \(the text encoder\), so train.llm must stay frozen"),
    (lambda run: run.stages[0].update(train={"bridge": "full", "vision": "full"}),
     r"train.vision must stay frozen"),
    (lambda run: run.model.update(image_token="<image>"), r"recipe model: unknown field\(s\) \['image_token'\]"),
    (lambda run: run.model["bridge"].update(cross_attention=[True]),
     r"recipe model.bridge: 'cross_attention' needs one flag per entry of 'channels' \(2\), got 1"),
    (lambda run: run.model["vision"].update(type="vq"), r"recipe model.vision: field 'type' must be one of"),
    (lambda run: run.model["noise"].update(sampler="euler"), r"recipe model.noise: field 'sampler' must be one of"),
    (lambda run: run.data.update(max_length=8), r"data sets max_length=8.*model.llm.max_length=16"),
    (lambda run: run.data.update(feature_cache="cache"), r"data sets feature_cache"),
    (lambda run: run.data.update(template="plain"), r"data sets template='plain'"),
    (lambda run: setattr(run.distributed, "strategy", "fsdp"), r"strategy 'fsdp'.*objective 'denoising'"),
], ids=["mixed objectives", "llm trains", "vae trains", "unknown model field", "unet blocks", "vae type", "sampler",
        "max_length", "feature cache", "template", "fsdp"])
def test_preflight_refuses_before_anything_loads(bert_dir, tmp_path, change, message):
    run = _run(bert_dir, str(tmp_path / "run"))
    change(run)
    with pytest.raises(ValueError, match=message):
        check_run(run)
    assert not os.path.exists(tmp_path / "run")

"""Generators through diffusers (issue 24 part 2): the call contract, parity with a hand-written sampling loop, the
alignment target, the Min-SNR denoising loss, bad pipeline directories, seeds.

Tiny random ``StableDiffusionPipeline`` directories with diffusers' own dummy component sizes
(:func:`mmbridge.testing.tiny_diffusers_pipeline`), saved and loaded through the registry offline.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
import torch

from mmbridge.model.generators import GENERATORS, TextConditioning, build_generator, min_snr_weights
from mmbridge.testing import tiny_diffusers_pipeline

CLIP_LENGTH, BERT_LENGTH, WIDTH = 16, 10, 32
SHORT, LONG = "a red circle", "what colour is the shape it which a describe picture there one in middle"


@pytest.fixture(scope="module")
def pipeline_dirs(tmp_path_factory) -> dict[str, str]:
    """Saved tiny pipelines: CLIP + DDIM, BERT + DDIM, CLIP + Euler ancestral, CLIP + DDIM with v-prediction."""
    def make(name: str, **options) -> str:
        return tiny_diffusers_pipeline(str(tmp_path_factory.mktemp(name)), **options)

    return {"clip": make("clip", condition_length=CLIP_LENGTH),
            "bert": make("bert", text_encoder="bert", condition_length=BERT_LENGTH),
            "euler": make("euler", scheduler="euler_ancestral"),
            "v": make("v", prediction_type="v_prediction")}


@pytest.fixture(scope="module")
def clip_generator(pipeline_dirs):
    return build_generator({"type": "diffusers", "path": pipeline_dirs["clip"], "modality": "image"})


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


# 1. the call contract


def test_registry_shapes_and_config(clip_generator, pipeline_dirs, monkeypatch):
    assert "diffusers" in GENERATORS.keys()
    assert (clip_generator.modality, clip_generator.condition_length, clip_generator.condition_width) == \
        ("image", CLIP_LENGTH, WIDTH)
    assert clip_generator.dtype == torch.float32 and clip_generator.device.type == "cpu"
    monkeypatch.chdir(os.path.dirname(pipeline_dirs["clip"]))
    relative = build_generator({"type": "diffusers", "path": os.path.basename(pipeline_dirs["clip"])})
    config = relative.export_config()
    assert config.path == pipeline_dirs["clip"] and os.path.isabs(config.path)  # rebuilds from any directory
    rebuilt = build_generator(dataclasses.asdict(config))
    assert torch.equal(rebuilt.encode_text([SHORT]).embeds, clip_generator.encode_text([SHORT]).embeds)


def test_generate_returns_one_rgb_image_per_row(clip_generator):
    conditioning = torch.randn(3, CLIP_LENGTH, WIDTH)
    images = clip_generator.generate(conditioning, steps=2, seed=0)
    assert len(images) == 3 and all(image.mode == "RGB" and image.size == (16, 16) for image in images)
    images = clip_generator.generate(conditioning[:1], steps=2, seed=0, height=24, width=32)
    assert len(images) == 1 and images[0].size == (32, 24)  # PIL size is (width, height)


@pytest.mark.parametrize("shape", [(2, CLIP_LENGTH, 16), (2, 77, WIDTH), (CLIP_LENGTH, WIDTH)])
def test_wrong_conditioning_shape_names_both_shapes(clip_generator, shape):
    conditioning = torch.randn(*shape)
    for call in (lambda: clip_generator.generate(conditioning, steps=1, seed=0),
                 lambda: clip_generator.denoising_loss(conditioning, torch.zeros(2, 3, 16, 16))):
        with pytest.raises(ValueError) as error:
            call()
        assert str(list(shape)) in str(error.value) and f"[B, {CLIP_LENGTH}, {WIDTH}]" in str(error.value)


def test_check_conditioning_at_build(clip_generator):
    clip_generator.check_conditioning(CLIP_LENGTH, WIDTH)
    with pytest.raises(ValueError, match=rf"\[77, 768\].*\[{CLIP_LENGTH}, {WIDTH}\]"):
        clip_generator.check_conditioning(77, 768)
    with pytest.raises(ValueError, match=rf"\[{CLIP_LENGTH}, 24\].*\[{CLIP_LENGTH}, {WIDTH}\]"):
        clip_generator.check_conditioning(CLIP_LENGTH, 24)


def test_negative_is_checked(clip_generator):
    conditioning = torch.randn(2, CLIP_LENGTH, WIDTH)
    with pytest.raises(ValueError, match=r"negative has shape \[2, 8, 32\]"):
        clip_generator.generate(conditioning, steps=1, seed=0, negative=torch.randn(2, 8, WIDTH))
    with pytest.raises(ValueError, match="negative has 3 rows; the conditioning has 2"):
        clip_generator.generate(conditioning, steps=1, seed=0, negative=torch.randn(3, CLIP_LENGTH, WIDTH))


# 2. equality with a hand-written sampling loop


def hand_written_sampling(generator, conditioning: torch.Tensor, steps: int, guidance: float, seed: int) -> np.ndarray:
    """Stable Diffusion sampling written out: the empty prompt's encoding as the unconditional side, the scheduler's
    timesteps, classifier-free guidance on the UNet's two predictions, the scheduler's step, the VAE's decoder,
    [-1, 1] → uint8. Returns ``[B, H, W, 3]``."""
    pipeline = generator.pipeline
    scheduler = type(pipeline.scheduler).from_config(pipeline.scheduler.config)
    tokenizer, unet, vae = pipeline.tokenizer, pipeline.unet, pipeline.vae
    random = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        empty_ids = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length,
                              return_tensors="pt").input_ids
        unconditional = pipeline.text_encoder(empty_ids)[0].expand(conditioning.shape[0], -1, -1)
        both = torch.cat([unconditional, conditioning])  # [2B, L, W]
        side = unet.config.sample_size  # latent side; images are side × the VAE's scale factor
        latents = torch.randn(conditioning.shape[0], unet.config.in_channels, side, side, generator=random)
        latents = latents * scheduler.init_noise_sigma
        scheduler.set_timesteps(steps)
        for timestep in scheduler.timesteps:
            model_input = scheduler.scale_model_input(torch.cat([latents, latents]), timestep)
            unguided, guided = unet(model_input, timestep, encoder_hidden_states=both).sample.chunk(2)
            noise = unguided + guidance * (guided - unguided)
            latents = scheduler.step(noise, timestep, latents, generator=random).prev_sample
        images = vae.decode(latents / vae.config.scaling_factor).sample  # [B, 3, H, W] in about [-1, 1]
    unit = (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    return (unit * 255).round().to(torch.uint8).numpy().astype(np.int16)


@pytest.mark.parametrize("name", ["clip", "euler"])
def test_generate_equals_hand_written_loop(pipeline_dirs, name):
    """Bit for bit: same uint8 pixels under the same seed (DDIM, and Euler ancestral whose steps draw noise)."""
    generator = build_generator({"type": "diffusers", "path": pipeline_dirs[name]})
    conditioning = generator.encode_text([SHORT, "a blue square"]).embeds
    images = generator.generate(conditioning, steps=3, guidance_scale=4.0, seed=7)
    expected = hand_written_sampling(generator, conditioning, steps=3, guidance=4.0, seed=7)
    assert np.abs(expected[0] - expected[1]).mean() > 2  # the two captions give different images
    np.testing.assert_array_equal(np.stack([pixels(image) for image in images]), expected)


def test_default_negative_is_the_empty_prompt(clip_generator):
    conditioning = torch.randn(2, CLIP_LENGTH, WIDTH)
    default = clip_generator.generate(conditioning, steps=2, seed=3)
    empty = clip_generator.encode_text([""]).embeds
    explicit = clip_generator.generate(conditioning, steps=2, seed=3, negative=empty)
    other = clip_generator.generate(conditioning, steps=2, seed=3, negative=torch.randn(1, CLIP_LENGTH, WIDTH))
    assert all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(default, explicit))
    assert np.abs(pixels(default[0]) - pixels(other[0])).mean() > 1


# 3. the alignment target


@pytest.mark.parametrize("name, length", [("clip", CLIP_LENGTH), ("bert", BERT_LENGTH)])
def test_encode_text_is_the_pipelines_encode_prompt(pipeline_dirs, name, length):
    generator = build_generator({"type": "diffusers", "path": pipeline_dirs[name]})
    pipeline = generator.pipeline
    assert generator.condition_length == pipeline.tokenizer.model_max_length == length
    encoded = generator.encode_text([SHORT, LONG])
    assert isinstance(encoded, TextConditioning) and encoded.truncated == [False, True]
    assert not encoded.embeds.requires_grad
    with torch.no_grad():
        own, _ = pipeline.encode_prompt([SHORT, LONG], "cpu", 1, False)
        ids = pipeline.tokenizer([SHORT, LONG], padding="max_length", max_length=length, truncation=True,
                                 return_tensors="pt").input_ids
        by_hand = pipeline.text_encoder(ids)[0]  # [2, L, W]
    assert encoded.embeds.shape == (2, length, WIDTH)
    assert torch.equal(encoded.embeds, own) and torch.equal(encoded.embeds, by_hand)
    assert not torch.equal(encoded.embeds[0], encoded.embeds[1])


def test_truncation_flag_is_per_caption(pipeline_dirs):
    generator = build_generator({"type": "diffusers", "path": pipeline_dirs["bert"]})
    nine = "a red circle in the middle one"
    assert len(generator.pipeline.tokenizer(nine).input_ids) == 9  # [CLS] + 7 words + [SEP]
    assert generator.encode_text([nine, nine + " red", nine + " red blue", SHORT]).truncated == \
        [False, False, True, False]  # 9, 10 (= L) and 11 tokens


# 4. the denoising loss


def test_min_snr_weights():
    snr = torch.tensor([0.0, 1.0, 5.0, 100.0])
    torch.testing.assert_close(min_snr_weights(snr, "epsilon"), torch.tensor([1.0, 1.0, 1.0, 0.05]))
    torch.testing.assert_close(min_snr_weights(snr, "v_prediction"), torch.tensor([0.0, 0.5, 5 / 6, 5 / 101]))
    torch.testing.assert_close(min_snr_weights(snr, "sample"), torch.tensor([0.0, 1.0, 5.0, 5.0]))
    with pytest.raises(ValueError, match="unknown prediction_type 'flow'"):
        min_snr_weights(snr, "flow")


def hand_written_loss(generator, conditioning, pixel_values, seed: int, timesteps: torch.Tensor) -> torch.Tensor:
    """The Min-SNR-5 loss written out from SD's scaled-linear betas (not the scheduler's tables)."""
    pipeline, random = generator.pipeline, torch.Generator().manual_seed(seed)
    prediction_type = pipeline.scheduler.config.prediction_type
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alpha_bar = torch.cumprod(1 - betas, 0)[timesteps].float().view(-1, 1, 1, 1)
    with torch.no_grad():
        posterior = pipeline.vae.encode(pixel_values).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=random)
        latents = latents * pipeline.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=random)
        noisy = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise
        prediction = pipeline.unet(noisy, timesteps, encoder_hidden_states=conditioning).sample
    snr = (alpha_bar / (1 - alpha_bar)).flatten()
    if prediction_type == "epsilon":
        target, weights = noise, torch.minimum(snr, torch.tensor(5.0)) / snr
    else:
        target = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
        weights = torch.minimum(snr, torch.tensor(5.0)) / (snr + 1)
    return (((prediction - target) ** 2).mean(dim=(1, 2, 3)) * weights).mean()


@pytest.mark.parametrize("name", ["clip", "v"])
def test_denoising_loss_equals_hand_computation(pipeline_dirs, name):
    generator = build_generator({"type": "diffusers", "path": pipeline_dirs[name]})
    conditioning = generator.encode_text(["a red circle", "a blue square", "a green circle", "one"]).embeds
    pixel_values = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    timesteps = torch.tensor([0, 40, 500, 999])  # snr from about 1175 (weight 5/snr) down to 0.005 (weight 1)
    loss = generator.denoising_loss(conditioning, pixel_values, torch.Generator().manual_seed(5), timesteps=timesteps)
    expected = hand_written_loss(generator, conditioning, pixel_values, 5, timesteps)
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)


def test_denoising_loss_gradient_reaches_the_conditioning_only(clip_generator):
    conditioning = clip_generator.encode_text([SHORT, "a blue square"]).embeds.clone().requires_grad_(True)
    pixel_values = (torch.rand(2, 3, 16, 16) * 2 - 1).requires_grad_(True)
    loss = clip_generator.denoising_loss(conditioning, pixel_values, torch.Generator().manual_seed(0))
    assert loss.dim() == 0 and loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert conditioning.grad is not None and torch.isfinite(conditioning.grad).all()
    assert conditioning.grad.abs().sum() > 0
    assert pixel_values.grad is None
    parameters = list(clip_generator.parameters())
    assert len(parameters) > 50 and not any(parameter.requires_grad or parameter.grad is not None
                                            for parameter in parameters)


def test_denoising_loss_depends_on_the_images(clip_generator):
    conditioning = clip_generator.encode_text([SHORT, "a blue square"]).embeds
    pixel_values = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1

    def loss(images: torch.Tensor) -> float:
        return clip_generator.denoising_loss(conditioning, images, torch.Generator().manual_seed(0)).item()

    assert loss(pixel_values) == loss(pixel_values)  # the generator fixes the draws
    assert abs(loss(pixel_values) - loss(-pixel_values)) > 3e-5  # about 3e-4 with these tiny weights


def test_denoising_loss_checks_the_images(clip_generator):
    conditioning = torch.randn(2, CLIP_LENGTH, WIDTH)
    with pytest.raises(ValueError, match=r"must lie in \[-1, 1\].*255"):
        clip_generator.denoising_loss(conditioning, torch.full((2, 3, 16, 16), 255.0))
    with pytest.raises(ValueError, match=r"pixel_values has shape \[3, 3, 16, 16\]; expected \[2, 3, H, W\]"):
        clip_generator.denoising_loss(conditioning, torch.zeros(3, 3, 16, 16))


# 5. bad pipeline directories


def broken_copy(source: str, target, edit) -> str:
    """A copy of pipeline ``source`` under ``target`` with ``edit(path)`` applied."""
    path = str(target / "pipeline")
    shutil.copytree(source, path)
    edit(path)
    return path


def edit_json(path: str, **changes) -> None:
    with open(path) as handle:
        data = json.load(handle)
    data.update(changes)
    with open(path, "w") as handle:
        json.dump({key: value for key, value in data.items() if value != "DELETE"}, handle)


def build_error(path: str, **fields) -> str:
    with pytest.raises(ValueError) as error:
        build_generator({"type": "diffusers", "path": path, **fields})
    assert "\n" not in str(error.value)  # one line
    return str(error.value)


def test_missing_components_are_named(pipeline_dirs, tmp_path):
    source = pipeline_dirs["clip"]
    unet_weights = lambda path: os.remove(os.path.join(path, "unet", "diffusion_pytorch_model.safetensors"))
    message = build_error(broken_copy(source, tmp_path / "a", unet_weights))
    assert "component 'unet' (UNet2DConditionModel) is missing" in message
    assert message.endswith(os.path.join("unet", "diffusion_pytorch_model.safetensors"))
    no_scheduler = lambda path: shutil.rmtree(os.path.join(path, "scheduler"))
    assert build_error(broken_copy(source, tmp_path / "b", no_scheduler)).endswith(
        os.path.join("scheduler", "scheduler_config.json"))
    no_text_config = lambda path: os.remove(os.path.join(path, "text_encoder", "config.json"))
    message = build_error(broken_copy(source, tmp_path / "c", no_text_config))
    assert "component 'text_encoder' (CLIPTextModel) is missing" in message
    null_vae = lambda path: edit_json(os.path.join(path, "model_index.json"), vae=[None, None])
    assert "model_index.json names no 'vae' component" in build_error(broken_copy(source, tmp_path / "d", null_vae))


def test_not_a_pipeline_or_not_image_from_embeds(pipeline_dirs, tmp_path):
    assert "is not a directory" in build_error(str(tmp_path / "nowhere"))
    assert "not a diffusers pipeline directory: it has no model_index.json" in build_error(
        os.path.join(pipeline_dirs["clip"], "unet"))
    garbled = lambda path: open(os.path.join(path, "model_index.json"), "w").write("{not json")
    assert "is not valid JSON" in build_error(broken_copy(pipeline_dirs["clip"], tmp_path / "a", garbled))
    for index, class_name in enumerate(("StableDiffusionImg2ImgPipeline", "DDPMPipeline")):
        other = lambda path: edit_json(os.path.join(path, "model_index.json"), _class_name=class_name)
        message = build_error(broken_copy(pipeline_dirs["clip"], tmp_path / f"c{index}", other))
        assert f"pipeline class {class_name}" in message and "takes: StableDiffusionPipeline" in message


def test_text_encoder_that_does_not_fit_the_unet(pipeline_dirs, tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel

    def narrow_text_encoder(path: str) -> None:
        config = CLIPTextConfig.from_pretrained(os.path.join(path, "text_encoder"), hidden_size=16,
                                                intermediate_size=32)
        CLIPTextModel(config).save_pretrained(os.path.join(path, "text_encoder"))

    message = build_error(broken_copy(pipeline_dirs["clip"], tmp_path / "a", narrow_text_encoder))
    assert f"encodes a prompt as [1, {CLIP_LENGTH}, 16]; the UNet takes [B, {CLIP_LENGTH}, {WIDTH}]" in message
    unset = lambda path: edit_json(os.path.join(path, "tokenizer", "tokenizer_config.json"), model_max_length="DELETE")
    assert "model_max_length is unset" in build_error(broken_copy(pipeline_dirs["bert"], tmp_path / "b", unset))
    too_long = lambda path: edit_json(os.path.join(path, "tokenizer", "tokenizer_config.json"), model_max_length=65)
    assert "model_max_length 65 exceeds the text encoder's max_position_embeddings 64" in build_error(
        broken_copy(pipeline_dirs["bert"], tmp_path / "c", too_long))


def test_config_values_are_checked(pipeline_dirs):
    assert "modality 'video' is not supported; known: image" in build_error(pipeline_dirs["clip"], modality="video")
    assert "dtype 'half' is unknown" in build_error(pipeline_dirs["clip"], dtype="half")
    assert "needs 'path'" in build_error("")


# 6. seeds


def test_seeds(clip_generator):
    conditioning = clip_generator.encode_text([SHORT]).embeds
    state = torch.get_rng_state()
    first, again, other = (clip_generator.generate(conditioning, steps=2, seed=seed)[0] for seed in (11, 11, 12))
    unseeded = [clip_generator.generate(conditioning, steps=2, seed=None)[0] for _ in range(2)]
    assert torch.equal(torch.get_rng_state(), state)  # a private generator: the global RNG is untouched
    assert np.array_equal(pixels(first), pixels(again))
    assert np.abs(pixels(first) - pixels(other)).mean() > 2
    assert np.abs(pixels(unseeded[0]) - pixels(unseeded[1])).mean() > 2

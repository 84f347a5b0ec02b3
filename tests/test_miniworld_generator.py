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
from mmbridge.data import collate
from mmbridge.train import apply_stage, train
from mmbridge.train.denoising import GeneratorModel, build_generator_model, parse_generator_spec
from mmbridge.train.interrupt import TrainingInterrupted
from mmbridge.train.objectives import StageObjective
from mmbridge.train.pixel_vae import pixel_vae
from mmbridge.train.preflight import check_run, parse_stage
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

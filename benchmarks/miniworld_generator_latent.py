"""The latent alternative to the MiniWorld generator's pixel space, measured: what a tiny trained VAE costs and keeps.

Latent diffusion would denoise a small AutoencoderKL's latents instead of pixels: 64 px renders become 16x16x4
latents (4x down, as a 3-block VAE gives), so the UNet runs on fewer positions than on 32 px pixels but the VAE must
be trained first. This script measures both sides on this machine (a measurement of the option the recipe does not
take, so its VAE trains in a short loop of its own, not through the trainer):

1. the VAE: ``--minutes`` of AdamW on 64 px MiniWorld caption renders (MSE + 1e-6 KL, as Stable Diffusion's VAE
   weighs its KL), then how often the colour check of ``miniworld_generator.py`` reads the requested colour of
   one-object test scenes in the VAE's reconstructions (beside the real renders);
2. the UNet: one training step (batch 32, bf16 autocast) of the recipe's UNet on 16x16x4 latents against the same
   UNet on 32x32x3 pixels and on 64x64x3 pixels.

    python benchmarks/miniworld_generator_latent.py --minutes 5
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from PIL import Image

from miniworld_generator import one_object_prompts, score
from mmbridge.model.vision.transform import ImageTransform
from mmbridge.train.denoising import UNetSpec, build_unet
from mmbridge.worlds.miniworld import make_sample

RECIPE_UNET = UNetSpec(channels=[32, 64, 128], cross_attention=[False, False, True])


def tiny_vae():
    """A 3-block AutoencoderKL: 64 px → 16x16x4."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64, 64),
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                         layers_per_block=1, norm_num_groups=8, sample_size=64, mid_block_add_attention=False)


def train_vae(minutes: float, batch: int, seed: int) -> tuple[torch.nn.Module, dict]:
    """The VAE after ``minutes`` of training on caption renders (a fresh batch of renders every step)."""
    torch.manual_seed(seed)
    vae = tiny_vae()
    transform = ImageTransform(size=(64, 64), resample="box")
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    began, step, losses = time.perf_counter(), 0, []
    while time.perf_counter() - began < minutes * 60:
        images = torch.stack([transform(make_sample("caption", "train", step * batch + index)[1][0])
                              for index in range(batch)])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            posterior = vae.encode(images).latent_dist
            reconstruction = vae.decode(posterior.sample()).sample
        loss = torch.nn.functional.mse_loss(reconstruction.float(), images) + 1e-6 * posterior.kl().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
        step += 1
    return vae.eval(), {"steps": step, "seconds": time.perf_counter() - began,
                        "last_50_loss": sum(losses[-50:]) / len(losses[-50:])}


def reconstruction_check(vae: torch.nn.Module, count: int) -> dict:
    """The colour check on the VAE's reconstructions of one-object test renders, and on the renders themselves."""
    prompts = one_object_prompts(count)
    transform = ImageTransform(size=(64, 64), resample="box")
    renders = [render.resize((64, 64), Image.Resampling.BOX) for _, _, render in prompts]
    with torch.no_grad():
        pixels = vae.decode(vae.encode(transform.batch(renders)).latent_dist.mode()).sample
    decoded = [Image.fromarray(((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())
               for image in pixels]
    colours = [colour for _, colour, _ in prompts]
    return {"reconstructions": score(decoded, colours), "renders": score(renders, colours),
            "mse": float(torch.nn.functional.mse_loss(pixels, transform.batch(renders)))}


def unet_step_seconds(size: int, channels: int, batch: int = 32, repeats: int = 3) -> float:
    """The fastest of ``repeats`` training steps (forward + backward, bf16 autocast) of the recipe's UNet."""
    torch.manual_seed(0)
    unet = build_unet(RECIPE_UNET, size, channels, 384)
    sample, timesteps = torch.randn(batch, channels, size, size), torch.randint(0, 1000, (batch,))
    conditioning = torch.randn(batch, 32, 384)
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            predicted = unet(sample, timesteps, encoder_hidden_states=conditioning).sample
        predicted.float().square().mean().backward()
        times.append(time.perf_counter() - began)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--n", type=int, default=180)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    steps = {"latent_16x16x4": unet_step_seconds(16, 4), "pixels_32x32x3": unet_step_seconds(32, 3),
             "pixels_64x64x3": unet_step_seconds(64, 3)}
    vae, training = train_vae(args.minutes, args.batch, args.seed)
    figures = {"unet_step_seconds_batch32": steps, "vae_training": training,
               "vae_check": reconstruction_check(vae, args.n), "threads": torch.get_num_threads()}
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()

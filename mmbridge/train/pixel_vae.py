"""A frozen AutoencoderKL whose latents are the pixels: pixel-space diffusion in a standard diffusers pipeline.

``StableDiffusionPipeline`` always decodes its latents with ``pipeline.vae``. A generator that denoises pixels
therefore needs a VAE that is the identity, and diffusers' ``AutoencoderKL`` can be set to one exactly enough
(relative error below 1e-6) by hand, with no training:

* one block (no down- or up-sampling: ``vae_scale_factor`` 1), no mid-block attention, and every ResNet's last
  convolution zero, so each ResNet passes its input through its shortcut unchanged;
* ``conv_in`` writes each colour channel ``x`` into a group of four channels ``[x, -x, K, -K]`` (``K`` =
  :data:`OFFSET`). The group norm that precedes ``conv_out`` then sees a group whose mean is 0 and whose standard
  deviation is ``sqrt((K² + mean(x²)) / 2)``, which for ``|x| <= 1`` is ``K / √2`` to within ``mean(x²) / (2K²)``
  (5e-7): the norm's weight ``K / √2`` undoes it, and the norm is linear;
* the SiLU after the norm is undone by the pair: ``silu(x) - silu(-x) = x`` for every ``x``, so ``conv_out``
  reads ``x`` as ``ch[4c] - ch[4c+1]``;
* the encoder's log-variance is the lowest diffusers allows (-30): a sample is the mean to within 3e-7.

Latents are the pixels in ``[-1, 1]`` (``scaling_factor`` 1). Only the centre tap of each 3x3 kernel is used,
so borders are exact too.
"""

from __future__ import annotations

import math

import torch
from diffusers import AutoencoderKL

OFFSET = 1000.0  # K: the constant pair in each group, large against the pixels (|x| <= 1)
LOG_VARIANCE = -30.0  # the encoder's log-variance: diffusers clamps to [-30, 20]
GROUP = 4  # channels per colour: x, -x, K, -K


def pixel_vae(image_size: int, channels: int = 3) -> AutoencoderKL:
    """An identity ``AutoencoderKL`` for ``channels``-channel images of ``image_size`` px (frozen, eval mode)."""
    width = GROUP * channels
    vae = AutoencoderKL(in_channels=channels, out_channels=channels, latent_channels=channels,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        block_out_channels=(width,), layers_per_block=1, norm_num_groups=channels,
                        sample_size=image_size, scaling_factor=1.0, force_upcast=False, mid_block_add_attention=False)
    with torch.no_grad():
        for parameter in vae.parameters():
            parameter.zero_()
        for norm in _group_norms(vae):
            norm.weight.fill_(1.0)  # the ResNets' norms: harmless, their output meets a zero convolution
        _spread(vae.encoder.conv_in, channels)
        _spread(vae.decoder.conv_in, channels)
        _gather(vae.encoder.conv_out, channels)
        vae.encoder.conv_out.bias[channels:] = LOG_VARIANCE
        _gather(vae.decoder.conv_out, channels)
        for norm in (vae.encoder.conv_norm_out, vae.decoder.conv_norm_out):
            norm.weight.fill_(OFFSET / math.sqrt(2.0))
        for conv in (vae.quant_conv, vae.post_quant_conv):
            conv.weight[:, :, 0, 0] = torch.eye(conv.weight.shape[0])
    return vae.requires_grad_(False).eval()


def _group_norms(vae: AutoencoderKL) -> list[torch.nn.GroupNorm]:
    return [module for module in vae.modules() if isinstance(module, torch.nn.GroupNorm)]


def _spread(conv: torch.nn.Conv2d, channels: int) -> None:
    """``channels`` → groups ``[x, -x, K, -K]`` per channel (centre tap and bias)."""
    for colour in range(channels):
        first = GROUP * colour
        conv.weight[first, colour, 1, 1] = 1.0
        conv.weight[first + 1, colour, 1, 1] = -1.0
        conv.bias[first + 2] = OFFSET
        conv.bias[first + 3] = -OFFSET


def _gather(conv: torch.nn.Conv2d, channels: int) -> None:
    """Groups → ``silu(x) - silu(-x) = x`` per channel in the first ``channels`` outputs."""
    for colour in range(channels):
        conv.weight[colour, GROUP * colour, 1, 1] = 1.0
        conv.weight[colour, GROUP * colour + 1, 1, 1] = -1.0

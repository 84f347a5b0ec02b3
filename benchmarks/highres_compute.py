"""Tokens and encoder FLOPs per image for each high-resolution strategy at the papers' scale (no weights, no data).

    python benchmarks/highres_compute.py                      # prints the table README.md shows
    python benchmarks/highres_compute.py --sizes 336x336 672x1008 1344x336

The encoder is CLIP ViT-L/14 at 336 px (LLaVA-1.5, LLaVA-NeXT and LLaVA-UHD's tower) built on the ``meta``
device, so nothing is computed: ``torch.utils.flop_counter`` counts the FLOPs of each distinct crop shape
(1 multiply-add = 2 FLOPs). The bridges: LLaVA's mlp2x_gelu into a 4096-wide LLM (base, AnyRes), a 64-query
resampler per slice (UHD, Monkey), and Fuyu's one linear layer over raw 30-px patches (no encoder). Monkey's
windows are 336-px tiles here (its paper uses 448-px tiles of a ViT-bigG), 2x3 as its 896x1344 input. The last
figure of each cell adds the bridge and a 13B LLM's prefill of the image's positions (2 FLOPs per parameter per
position; attention scores left out) — the whole-model ratio LLaVA-UHD's 94% speaks of.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmbridge.cli import parse_image_size  # noqa: E402
from mmbridge.model.bridges import build_bridge  # noqa: E402
from mmbridge.model.highres import build_highres  # noqa: E402
from mmbridge.model.highres.compute import ImageCost, format_flops, image_cost  # noqa: E402
from mmbridge.model.vision import build_vision  # noqa: E402
from mmbridge.testing import tiny_tokenizer  # noqa: E402

CLIP_L_336 = {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
              "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14}
LLM_WIDTH = 4096
MLP = {"type": "mlp", "depth": 2, "activation": "gelu"}
RESAMPLER = {"type": "perceiver", "num_latents": 64, "depth": 1, "heads": 16}
STRATEGIES = {  # name → (vision spec, bridge spec, highres spec or None)
    "base (LLaVA-1.5)": ({"type": "hf", "hf_config": CLIP_L_336}, MLP, None),
    "AnyRes (LLaVA-NeXT)": ({"type": "hf", "hf_config": CLIP_L_336}, MLP,
                            {"type": "anyres", "grid": [[1, 2], [2, 1], [2, 2], [3, 1], [1, 3]]}),
    "UHD (LLaVA-UHD)": ({"type": "hf", "hf_config": CLIP_L_336}, RESAMPLER, {"type": "uhd"}),
    "Monkey": ({"type": "hf", "hf_config": CLIP_L_336}, RESAMPLER, {"type": "monkey", "windows": [2, 3]}),
    "Fuyu / OtterHD": ({"type": "patch", "patch_size": 30}, {"type": "mlp", "depth": 1},
                       {"type": "native", "max_size": [1080, 1920]}),
}
SIZES = ["336x336", "672x1008", "1344x336"]


def strategy_costs(sizes: list[tuple[int, int]], names: list[str]) -> dict[str, list[ImageCost]]:
    """Per strategy, the cost of one image of each size (components built on the meta device)."""
    tokenizer = tiny_tokenizer(tempfile.mkdtemp(prefix="mmbridge-compute-"))
    costs = {}
    for name in names:
        vision_spec, bridge_spec, highres_spec = STRATEGIES[name]
        with torch.device("meta"):
            vision = build_vision(vision_spec)
            bridge = build_bridge(bridge_spec, vision.feature_dim, LLM_WIDTH)
            strategy = build_highres(highres_spec) if highres_spec else None
            if strategy is not None:
                strategy.attach(vision, bridge, tokenizer, LLM_WIDTH)
            costs[name] = [image_cost(vision, bridge, strategy, size) for size in sizes]
    return costs


def markdown_table(costs: dict[str, list[ImageCost]], sizes: list[tuple[int, int]], llm_parameters: float) -> str:
    """One row per strategy; per size: LLM positions (visual + separators), crops, encoder FLOPs and its ratio to
    the base row's, and the ratio of encoder + bridge + LLM prefill FLOPs (the prefill approximated as
    2 × ``llm_parameters`` per position, attention scores left out)."""
    base = next(iter(costs.values()))
    header = ["strategy"] + [f"{width}×{height}: positions / crops / encoder FLOPs (× base) / with LLM (× base)"
                             for height, width in sizes]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * len(sizes)]
    for name, row in costs.items():
        cells = []
        for cost, reference in zip(row, base):
            ratio = cost.encoder_flops / reference.encoder_flops if reference.encoder_flops else float("nan")
            whole = total_flops(cost, llm_parameters) / total_flops(reference, llm_parameters)
            cells.append(f"{cost.llm_tokens} / {cost.crops} / {format_flops(cost.encoder_flops)} ({ratio:.2f}×) / "
                         f"{whole:.2f}×")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def total_flops(cost: ImageCost, llm_parameters: float) -> float:
    """Encoder + bridge + the LLM's prefill of the image's positions (2 FLOPs per parameter per position)."""
    return cost.encoder_flops + cost.bridge_flops + 2 * llm_parameters * cost.llm_tokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=SIZES, type=parse_image_size, metavar="WxH")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    parser.add_argument("--llm-parameters", type=float, default=13e9,
                        help="LLM size for the prefill column (LLaVA-UHD's comparison uses Vicuna-13B)")
    args = parser.parse_args(argv)
    sizes = [parse_image_size(size) if isinstance(size, str) else size for size in args.sizes]
    print(markdown_table(strategy_costs(sizes, args.strategies), sizes, args.llm_parameters))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

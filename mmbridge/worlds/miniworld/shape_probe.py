"""The shape probe: a nearest-prototype classifier of blob shapes, fitted on MiniWorld's own renders.

No learned model from outside: at first use the probe draws every shape of :data:`SHAPES` at the extents of both
size classes, each under five *views* — sharp, blurred (Gaussian, radius 2 and 4 px at 224), and downscaled to 64
and to 32 px (what small generators give; the scorer upscales them again) — finds the blobs as the scorer does
(:func:`~mmbridge.worlds.miniworld.blobs.find_blobs`) and keeps, per shape and view, the mean :func:`feature`: a
*prototype* per size class. A blob's shape is the shape of the prototype nearest to its feature (largest cosine).
Fitting takes about 0.2 s of CPU time and is cached for the process. It uses fixed renders, PIL and single-threaded
numpy, no randomness: the same on every run and thread count (float sums may differ in their last bits between
CPUs, far below the gaps between prototypes).

The feature is scale-free and insensitive to blur: the blob's coverage (:class:`~.blobs.Blob`) resampled on a
:data:`GRID` x :data:`GRID` grid centred at its centre of mass, spanning ± the square root of its mass (its area in
pixels), then scaled to unit length. The probe also keeps each shape's *fill*, its mass over its extent squared,
so that a blob's extent (and with it its size class) follows from its mass and its shape.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from mmbridge.worlds.miniworld.blobs import Blob, find_blobs
from mmbridge.worlds.miniworld.render import draw_object
from mmbridge.worlds.miniworld.scene import CANVAS, STANDARD_SCALE, SceneObject
from mmbridge.worlds.miniworld.vocabulary import BACKGROUNDS, COLOURS, SHAPES

GRID = 12  # feature resolution: GRID x GRID coverage samples
SUPERSAMPLE = 4  # nearest-pixel samples per grid cell and axis, averaged
VIEWS = ("sharp", "blur 2", "blur 4", "64", "32")  # how each probe render is seen (see the module docstring)
# probe layout per canvas: two large and two small objects, centres off the downscaling grid by varied amounts
PROBE_PLACES = (((54, 57), "large"), ((170, 166), "large"), ((166, 52), "small"), ((57, 171), "small"))


def view(image: Image.Image, name: str) -> Image.Image:
    """``image`` as seen under view ``name``: unchanged (``sharp``), blurred (``blur R``: Gaussian, radius R px),
    or downscaled to a side of ``name`` pixels (bicubic)."""
    if name == "sharp":
        return image
    if name.startswith("blur "):
        return image.filter(ImageFilter.GaussianBlur(float(name.split()[1])))
    side = int(name)
    return image.resize((side, side * image.height // image.width), Image.BICUBIC)


def feature(blob: Blob) -> np.ndarray:
    """The blob's coverage around its centre of mass, ``[GRID * GRID]``, unit length (see the module docstring)."""
    coverage = blob.coverage  # [h, w]
    mass = max(float(coverage.sum()), 1e-6)
    rows, columns = np.indices(coverage.shape)
    centre_y, centre_x = float((coverage * rows).sum()) / mass, float((coverage * columns).sum()) / mass
    half = float(np.sqrt(mass))
    steps = ((np.arange(GRID * SUPERSAMPLE) + 0.5) / (GRID * SUPERSAMPLE)) * 2.0 - 1.0  # [G*S] in (-1, 1)
    sample_x = np.clip(np.round(centre_x + steps * half).astype(int) + 1, 0, coverage.shape[1] + 1)
    sample_y = np.clip(np.round(centre_y + steps * half).astype(int) + 1, 0, coverage.shape[0] + 1)
    padded = np.pad(coverage, 1)  # outside the region the object covers nothing
    samples = padded[sample_y[:, None], sample_x[None, :]]  # [G*S, G*S]
    cells = samples.reshape(GRID, SUPERSAMPLE, GRID, SUPERSAMPLE).mean(axis=(1, 3)).ravel()  # [G*G]
    return cells / max(float(np.linalg.norm(cells)), 1e-9)


@dataclass(frozen=True)
class ShapeProbe:
    """Prototype features ``[P, GRID * GRID]`` with their shapes ``[P]``, and each shape's fill."""

    prototypes: np.ndarray
    shapes: tuple[str, ...]
    fills: dict[str, float]

    def shape(self, blob: Blob) -> str:
        """The shape of the prototype nearest to ``blob``'s feature."""
        return self.shapes[int(np.argmax(self.prototypes @ feature(blob)))]

    def extent(self, blob: Blob, shape: str) -> float:
        """The extent (side of the square the shape fills) that ``blob``'s mass gives for ``shape``, in pixels."""
        return float(np.sqrt(blob.mass / self.fills[shape]))


def probe_extents() -> dict[str, tuple[int, int]]:
    """Per size class, the smallest and largest extent MiniWorld draws on its canvas."""
    return {size: tuple(round(fraction * CANVAS) for fraction in STANDARD_SCALE.extent_range(size))
            for size in ("small", "large")}


def probe_canvas(shape: str) -> tuple[Image.Image, list[SceneObject]]:
    """A white canvas with ``shape`` at the smallest and largest extent of each size class, in varied colours."""
    extents = probe_extents()
    image = Image.new("RGB", (CANVAS, CANVAS), BACKGROUNDS["white"])
    draw = ImageDraw.Draw(image)
    colours = list(COLOURS)
    objects = []
    for number, ((x, y), size) in enumerate(PROBE_PLACES):
        colour = colours[(SHAPES.index(shape) + 2 * number) % len(colours)]
        item = SceneObject(shape, colour, size, x, y, extents[size][number % 2], COLOURS[colour])
        draw_object(draw, item)
        objects.append(item)
    return image, objects


def fit_probe() -> ShapeProbe:
    """Fit the probe on fresh renders (see the module docstring)."""
    prototypes, shapes, fills = [], [], {}
    for shape in SHAPES:
        ratios = []
        for name in VIEWS:
            image, objects = probe_canvas(shape)
            blobs = find_blobs(view(image, name), CANVAS, CANVAS)
            if len(blobs) != len(objects):
                raise RuntimeError(f"shape probe: {len(blobs)} blobs in a {name} render of {len(objects)} {shape}s")
            drawn = _nearest_objects(blobs, objects)
            ratios += [blob.mass / item.extent ** 2 for blob, item in zip(blobs, drawn)]
            for size in ("small", "large"):
                mean = np.mean([feature(blob) for blob, item in zip(blobs, drawn) if item.size == size], axis=0)
                prototypes.append(mean / np.linalg.norm(mean))
                shapes.append(shape)
        fills[shape] = float(np.mean(ratios))
    return ShapeProbe(np.stack(prototypes), tuple(shapes), fills)


def _nearest_objects(blobs: list[Blob], objects: list[SceneObject]) -> list[SceneObject]:
    """For each blob, the drawn object whose centre is nearest to the blob's."""
    return [min(objects, key=lambda item: (item.x - blob.centre[0]) ** 2 + (item.y - blob.centre[1]) ** 2)
            for blob in blobs]


@functools.cache
def shape_probe() -> ShapeProbe:
    """The probe, fitted at first use and kept for the process."""
    return fit_probe()

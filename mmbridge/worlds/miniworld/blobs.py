"""Finding MiniWorld's objects in pixels: saturated blobs on a light background, with no learned model.

Every object colour is saturated (its channels differ by 80 or more, jitter included) and every background is a
light grey-ish tint (channels within 35 of each other, faint patterns too), so the *chroma* of a pixel (its
largest channel minus its smallest) tells object from background whatever the background's kind. A generated
image of any size is first resized to the scene's canvas, lightly smoothed (a 3x3 box: a generator's pixel noise
averages out), then:

1. pixels with chroma >= :data:`CHROMA_THRESHOLD` are candidate object pixels, grouped into 8-connected
   components (union–find over row runs, numpy and Python: exact, the same on any CPU and thread count);
2. inside each component only the pixels with at least half of its core chroma stay (:data:`HALF_LEVEL`): the
   faint halo that blurring or upscaling spreads around an object is not the object, and two objects whose halos
   touch come apart again;
3. what is left, split into components again, is a :class:`Blob` when it covers at least
   :data:`MIN_AREA_FRACTION` of the canvas (a quarter of the smallest object MiniWorld draws): smaller specks
   are noise.

A blob knows its pixel mask, box, area and colour (the palette colour nearest to the median RGB of its core), and
its *coverage*: per pixel of its box widened by :data:`REGION_MARGIN`, how much of the pixel the object covers
(0–1, its chroma between the local background's and its core's). Blurring and resizing move coverage around but
keep its sum, the object's area, so shape and size are measured on it (:mod:`.shape_probe`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from mmbridge.worlds.miniworld.vocabulary import COLOURS

CHROMA_THRESHOLD = 60.0  # backgrounds stay below 36, the least saturated object colour (brown) is at 80 or more
HALF_LEVEL = 0.5  # a blob keeps the pixels with at least this share of its core chroma
CORE_PERCENTILE = 90  # the core chroma of a component: this percentile of its pixels' chroma
CORE_LEVEL = 0.8  # core pixels (the ones whose median names the colour) reach this share of the core chroma
MIN_AREA_FRACTION = 0.0024  # 120 px at 224x224: a quarter of the smallest object (a small star, ~480 px)
REGION_MARGIN = 0.03  # share of the side a blob's coverage reaches beyond its box (7 px at 224; objects keep 16)
PALETTE_NAMES = tuple(COLOURS)
PALETTE = np.array([COLOURS[name] for name in PALETTE_NAMES], dtype=np.float32)  # [C, 3]


@dataclass
class Blob:
    """One object found in the pixels: ``mask`` is ``[y1 - y0 + 1, x1 - x0 + 1]`` inside ``box`` (canvas pixels,
    ends included), ``rgb`` the median colour of its core, ``colour`` the nearest palette name, ``coverage`` the
    object's share of each pixel of ``region`` (its box widened by :data:`REGION_MARGIN`, clipped to the canvas)."""

    box: tuple[int, int, int, int]
    mask: np.ndarray
    area: int
    rgb: tuple[float, float, float]
    colour: str
    region: tuple[int, int, int, int]
    coverage: np.ndarray

    @property
    def mass(self) -> float:
        """The object's area in pixels, from its coverage (what blurring keeps)."""
        return float(self.coverage.sum())

    @property
    def centre(self) -> tuple[float, float]:
        """The middle of the box (what a scene object's ``x``, ``y`` is)."""
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2

    @property
    def span(self) -> int:
        """The longer side of the box, in pixels."""
        return max(self.box[2] - self.box[0], self.box[3] - self.box[1]) + 1


def canvas_pixels(image: Image.Image, width: int, height: int) -> np.ndarray:
    """``image`` as float RGB ``[height, width, 3]``: resized (bicubic) to the canvas, then a 3x3 box blur."""
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.BICUBIC)  # keeps more of a small image's shapes than bilinear
    return np.asarray(image.filter(ImageFilter.BoxBlur(1)), dtype=np.float32)


def chroma(pixels: np.ndarray) -> np.ndarray:
    """Largest minus smallest channel per pixel: ``[H, W, 3]`` → ``[H, W]``."""
    red, green, blue = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    return np.maximum(np.maximum(red, green), blue) - np.minimum(np.minimum(red, green), blue)


def find_blobs(image: Image.Image, width: int, height: int) -> list[Blob]:
    """The objects in ``image`` (any size) seen on a ``width`` x ``height`` canvas, top to bottom, left to right."""
    pixels = canvas_pixels(image, width, height)  # [H, W, 3]
    saturation = chroma(pixels)  # [H, W]
    min_area = MIN_AREA_FRACTION * width * height
    labels, count = label_components(saturation >= CHROMA_THRESHOLD)
    areas = np.bincount(labels.ravel(), minlength=count + 1)  # [count + 1]
    cores = np.zeros(count + 1)  # per component: its core chroma (0 for components too small to hold a blob)
    for label in np.flatnonzero(areas[1:] >= min_area) + 1:
        cores[label] = np.percentile(saturation[labels == label], CORE_PERCENTILE)
    levels = np.where(cores > 0, HALF_LEVEL * cores, np.inf)  # [count + 1]; label 0 (background) keeps nothing
    parts, part_count = label_components(saturation >= levels[labels])  # parts never span two components
    part_areas = np.bincount(parts.ravel(), minlength=part_count + 1)
    blobs = []
    for part in np.flatnonzero(part_areas[1:] >= min_area) + 1:
        mask = parts == part
        blobs.append(_blob(mask, pixels, saturation, float(cores[labels[mask][0]])))
    return sorted(blobs, key=lambda blob: (blob.box[1], blob.box[0]))


def _blob(mask: np.ndarray, pixels: np.ndarray, saturation: np.ndarray, core: float) -> Blob:
    """The :class:`Blob` of one full-canvas ``mask`` ``[H, W]`` whose component's core chroma is ``core``."""
    rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]), int(columns[0]), int(columns[-1])
    values = saturation[mask]
    rgb = np.median(pixels[mask][values >= CORE_LEVEL * float(values.max())], axis=0)  # [3]
    colour = PALETTE_NAMES[int(np.argmin(((PALETTE - rgb) ** 2).sum(axis=1)))]
    height, width = mask.shape
    margin = max(1, round(REGION_MARGIN * min(width, height)))
    region = (max(0, x0 - margin), max(0, y0 - margin), min(width - 1, x1 + margin), min(height - 1, y1 + margin))
    window = saturation[region[1]:region[3] + 1, region[0]:region[2] + 1]  # [h, w]
    frame = np.concatenate([window[0], window[-1], window[1:-1, 0], window[1:-1, -1]])
    background = float(np.median(frame))  # the local background's chroma, beyond the blob's halo
    coverage = np.clip((window - background) / max(core - background, 1.0), 0.0, 1.0)  # [h, w]
    return Blob((x0, y0, x1, y1), mask[y0:y1 + 1, x0:x1 + 1], int(mask.sum()),
                (float(rgb[0]), float(rgb[1]), float(rgb[2])), colour, region, coverage)


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a boolean ``mask`` ``[H, W]``: labels ``[H, W]`` (0 outside, 1…n) and n.

    Union–find over the runs of each row: a run joins every run of the row above that touches it, diagonals
    included. Labels are numbered in the order of each component's first run (top to bottom, left to right).
    """
    height, width = mask.shape
    padded = np.zeros((height, width + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    steps = np.diff(padded, axis=1)  # [H, W + 1]: +1 where a run starts, -1 just after it ends
    rows, firsts = np.nonzero(steps == 1)
    lasts = np.nonzero(steps == -1)[1] - 1  # row-major order pairs each run's start with its end
    row_starts = np.searchsorted(rows, np.arange(height + 1)).tolist()  # runs of row r: row_starts[r]…[r+1]
    firsts_list, lasts_list = firsts.tolist(), lasts.tolist()
    parent = list(range(len(firsts_list)))
    for row in range(1, height):
        above, above_end = row_starts[row - 1], row_starts[row]
        for run in range(row_starts[row], row_starts[row + 1]):
            while above < above_end and lasts_list[above] < firsts_list[run] - 1:
                above += 1
            touching = above
            while touching < above_end and firsts_list[touching] <= lasts_list[run] + 1:
                _union(parent, touching, run)
                touching += 1
    labels = np.zeros(mask.shape, dtype=np.int32)
    numbers: dict[int, int] = {}
    for run, (row, first, last) in enumerate(zip(rows.tolist(), firsts_list, lasts_list)):
        labels[row, first:last + 1] = numbers.setdefault(_find(parent, run), len(numbers) + 1)
    return labels, len(numbers)


def _find(parent: list[int], node: int) -> int:
    """The root of ``node``'s set (halving the path on the way)."""
    while parent[node] != node:
        parent[node] = parent[parent[node]]
        node = parent[node]
    return node


def _union(parent: list[int], first: int, second: int) -> None:
    """Join the sets of ``first`` and ``second`` (the smaller root becomes the parent, so roots come first)."""
    first_root, second_root = _find(parent, first), _find(parent, second)
    if first_root != second_root:
        parent[max(first_root, second_root)] = min(first_root, second_root)

"""Videos: objects moving in straight lines over 8–16 frames, appearing and disappearing.

A :class:`Track` is one object's motion (direction, start and end points, the frames
it is visible in); every frame is a :class:`Scene` built from the tracks. Objects
move along one axis per video, each in its own lane, so they never overlap.
"""

from __future__ import annotations

from dataclasses import dataclass

from mmbridge.worlds.miniworld.scene import STANDARD_SCALE, Background, Scene, SceneObject, jittered
from mmbridge.worlds.miniworld.splits import World
from mmbridge.worlds.miniworld.vocabulary import Pair

MOVES = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
TRAVEL = (0.3, 0.5)  # share of the side an object travels over the whole video


@dataclass
class Track:
    """One object moving from ``start`` to ``end`` over the video, visible in frames ``[appear, disappear)``."""

    item: SceneObject
    direction: str
    start: tuple[int, int]
    end: tuple[int, int]
    appear: int
    disappear: int

    def visible(self, frame: int) -> bool:
        return self.appear <= frame < self.disappear

    def position(self, frame: int, frames: int) -> tuple[int, int]:
        """Where the object is at ``frame`` (linear motion over the whole video)."""
        share = frame / max(1, frames - 1)
        return (round(self.start[0] + (self.end[0] - self.start[0]) * share),
                round(self.start[1] + (self.end[1] - self.start[1]) * share))

    def to_dict(self, frames: int) -> dict:
        item = self.item
        positions = [list(self.position(frame, frames)) if self.visible(frame) else None for frame in range(frames)]
        return {"shape": item.shape, "colour": item.colour, "size": item.size, "extent": item.extent,
                "rgb": list(item.rgb), "direction": self.direction, "start": list(self.start), "end": list(self.end),
                "appear": self.appear, "disappear": self.disappear, "positions": positions}


def make_tracks(world: World, pairs: list[Pair], frames: int, side: int,
                schedule: list[tuple[int, int]]) -> list[Track]:
    """Tracks of small objects for ``pairs`` along one random axis, one lane each; ``schedule``: (appear, disappear)."""
    horizontal = world.chance(0.5)
    lane = side / len(pairs)
    tracks = []
    for position, ((colour, shape), (appear, disappear)) in enumerate(zip(pairs, schedule)):
        extent = round(world.uniform(*STANDARD_SCALE.small) * side)
        direction = world.choice(("left", "right") if horizontal else ("up", "down"))
        travel = round(world.uniform(*TRAVEL) * side)
        low, high = extent // 2 + 2, side - extent + extent // 2 - 2
        along = world.integer(low, high - travel)
        lane_low = max(low, round(lane * position) + extent // 2 + 1)
        lane_high = min(high, round(lane * (position + 1)) - extent + extent // 2 - 1)
        across = world.integer(lane_low, max(lane_low, lane_high))
        first, last = (along, along + travel) if direction in ("right", "down") else (along + travel, along)
        start, end = ((first, across), (last, across)) if horizontal else ((across, first), (across, last))
        item = SceneObject(shape, colour, "small", start[0], start[1], extent, jittered(world, colour))
        tracks.append(Track(item, direction, start, end, appear, disappear))
    return tracks


def frame_scenes(tracks: list[Track], frames: int, side: int, background: Background) -> list[Scene]:
    """One scene per frame holding the visible objects at their positions."""
    scenes = []
    for frame in range(frames):
        objects = []
        for track in tracks:
            if track.visible(frame):
                x, y = track.position(frame, frames)
                item = track.item
                objects.append(SceneObject(item.shape, item.colour, item.size, x, y, item.extent, item.rgb))
        scenes.append(Scene(side, side, background, objects))
    return scenes


def video_description(tracks: list[Track], frames: int, side: int, background: Background) -> dict:
    """The stored ``scene`` of a video: canvas, background and every track with its per-frame positions."""
    return {"kind": "video", "frames": frames, "width": side, "height": side, "background": background.to_dict(),
            "tracks": [track.to_dict(frames) for track in tracks]}

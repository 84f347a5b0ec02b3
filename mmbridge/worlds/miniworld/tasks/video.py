"""Video questions over 8–16 frames: direction of motion, order of appearance, counts over time."""

from __future__ import annotations

from mmbridge.worlds.miniworld.language import count_answers, refer
from mmbridge.worlds.miniworld.questions import Question, object_answers
from mmbridge.worlds.miniworld.scene import CANVAS, random_background
from mmbridge.worlds.miniworld.splits import World
from mmbridge.worlds.miniworld.task import Episode, Task
from mmbridge.worlds.miniworld.video import Track, frame_scenes, make_tracks, video_description
from mmbridge.worlds.miniworld.vocabulary import Pair

DIRECTION_ANSWERS = {"left": ["left", "to the left", "leftward", "leftwards"],
                     "right": ["right", "to the right", "rightward", "rightwards"],
                     "up": ["up", "upward", "upwards"], "down": ["down", "downward", "downwards"]}
FOCUS_KINDS = ("direction", "first")  # kinds that ask about a colour–shape object (usable when compositional)
MIN_VISIBLE = 3


def distinct_pairs(world: World, count: int) -> list[Pair]:
    """The focus pair, then ``count - 1`` other pairs, all different."""
    pairs = [world.focus_pair()]
    while len(pairs) < count:
        pairs.append(world.pair(exclude=pairs))
    return pairs


def build_video(world: World) -> Episode | None:
    """A direction, first/last-appearance or count question about a short clip of moving objects."""
    frames = world.integer(8, 16)
    kind = world.choice(FOCUS_KINDS if world.compositional else FOCUS_KINDS + ("count",))
    count = {"direction": world.integer(1, 3), "first": world.integer(2, 3), "count": world.integer(1, 4)}[kind]
    schedule = _schedule(world, kind, count, frames)
    tracks = make_tracks(world, distinct_pairs(world, count), frames, CANVAS, schedule)
    background = random_background(world)
    question = {"direction": _direction, "first": _order, "count": _count}[kind](world, tracks, frames)
    if question is None:
        return None
    return Episode(frame_scenes(tracks, frames, CANVAS, background), [question], layout="video",
                   description=video_description(tracks, frames, CANVAS, background))


def _schedule(world: World, kind: str, count: int, frames: int) -> list[tuple[int, int]]:
    """(appear, disappear) per object: all visible throughout, staggered entries, or random spans."""
    if kind == "direction":
        return [(0, frames)] * count
    if kind == "first":
        entries = sorted(world.sample(range(0, frames - MIN_VISIBLE, 2), count))
        # ranks[i]: the entry slot of object i; in the compositional split the focus (object 0) enters first
        ranks = [0] + world.shuffled(range(1, count)) if world.compositional else world.shuffled(range(count))
        return [(entries[ranks[position]], frames) for position in range(count)]
    spans = []
    for _ in range(count):
        appear = world.integer(0, frames - MIN_VISIBLE)
        spans.append((appear, world.integer(appear + MIN_VISIBLE, frames)))
    return spans


def _direction(world: World, tracks: list[Track], frames: int) -> Question | None:
    """"In which direction does the red circle move?" about the focus."""
    focus = tracks[0]
    name = refer(world, focus.item, [track.item for track in tracks])
    if name is None:
        return None
    return Question(f"In which direction does the {name} move?", "short", focus.direction,
                    DIRECTION_ANSWERS[focus.direction])


def _order(world: World, tracks: list[Track], frames: int) -> Question | None:
    """"Which object appears first?" (or the colour/shape of the first or last one to appear)."""
    ordered = sorted(tracks, key=lambda track: track.appear)
    items = [track.item for track in tracks]
    which = "first" if world.compositional or world.chance(0.5) else "last"
    target = ordered[0] if which == "first" else ordered[-1]
    style = world.choice(("object", "colour", "shape"))
    if style == "colour":
        return Question(f"What colour is the object that appears {which}?", "short", target.item.colour,
                        [target.item.colour])
    if style == "shape":
        return Question(f"What shape is the object that appears {which}?", "short", target.item.shape,
                        [target.item.shape])
    name = refer(world, target.item, items)
    if name is None:
        return None
    return Question(f"Which object appears {which}?", "short", name, object_answers(target.item, items))


def _count(world: World, tracks: list[Track], frames: int) -> Question:
    """"How many different objects appear in the video?" or how many are visible in the last frame."""
    if world.chance(0.5):
        total = len(tracks)
        return Question("How many different objects appear in the video?", "short", str(total), count_answers(total))
    visible = sum(track.visible(frames - 1) for track in tracks)
    return Question("How many objects are visible in the last frame?", "short", str(visible), count_answers(visible))


TASKS = [Task("video", "8-16 frames of moving objects: direction, order of appearance, counts over time",
              build_video)]

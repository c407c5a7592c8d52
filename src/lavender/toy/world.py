"""Scenes of the toy world: coloured shapes on a background, drawn with exact masks.

A :class:`Scene` is a plain description (background, objects with shape, colour, size,
centre and radius); :func:`render` turns it into pixels and one boolean mask per object.
Objects never overlap and are drawn without anti-aliasing, so every pixel inside an
object's mask has exactly that object's colour and each mask is exactly its object:
answers and masks are re-derivable from the description alone.

Everything random comes from a ``numpy.random.Generator`` passed in, so a scene is a pure
function of its seed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np

SHAPES = ("circle", "square", "triangle", "diamond")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (45, 80, 225),
    "yellow": (235, 205, 30),
    "purple": (150, 55, 190),
}
SIZES = ("small", "big")
# Radius ranges in pixels at 64×64 (scaled with the image): big objects span about half of a
# side, so they cover many cells of a 16×16 attention grid.
RADII = {"small": (7.0, 9.0), "big": (12.0, 15.0)}
_REFERENCE_SIZE = 64
# Every shape lies within EXTENT · r of its centre (the square's corner is the farthest).
EXTENT = 1.15

# Shape–colour pairs that appear only in the out-of-distribution test: one per shape, each
# colour at most once, so every shape and every colour is still seen in training.
HELD_OUT_PAIRS = frozenset({("circle", "green"), ("square", "yellow"), ("triangle", "blue"), ("diamond", "red")})

BackgroundKind = Literal["solid", "gradient", "noise", "stripes"]
# Stripes are the out-of-distribution texture: training scenes never have them.
TRAIN_BACKGROUNDS: tuple[BackgroundKind, ...] = ("solid", "gradient", "noise")
OOD_BACKGROUNDS: tuple[BackgroundKind, ...] = ("stripes",)
# Out-of-distribution objects are drawn smaller (a scale shift); small and big stay apart.
OOD_SCALE = 0.85


@dataclass(frozen=True)
class Object:
    shape: str
    color: str
    size: str
    cx: float
    cy: float
    r: float
    rgb: tuple[int, int, int]


@dataclass(frozen=True)
class Background:
    kind: BackgroundKind
    rgb: tuple[int, int, int]
    rgb2: tuple[int, int, int]
    angle: float = 0.0  # gradient / stripe direction, radians
    period: float = 8.0  # stripe period in pixels
    noise_seed: int = 0


@dataclass(frozen=True)
class Scene:
    size: int
    background: Background
    objects: tuple[Object, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Scene:
        # JSON turns the RGB tuples into lists; equality and hashing need them back as tuples
        bg = data["background"]
        background = Background(**{**bg, "rgb": tuple(bg["rgb"]), "rgb2": tuple(bg["rgb2"])})
        objects = tuple(Object(**{**o, "rgb": tuple(o["rgb"])}) for o in data["objects"])
        return cls(size=data["size"], background=background, objects=objects)


@dataclass(frozen=True)
class SceneConfig:
    """What a split's scenes may contain."""

    size: int = 64
    min_objects: int = 1
    max_objects: int = 4
    backgrounds: tuple[BackgroundKind, ...] = TRAIN_BACKGROUNDS
    scale: float = 1.0
    # "exclude": held-out pairs never appear; "require": at least one object has one
    held_out: Literal["exclude", "require"] = "exclude"


def allowed_pair(shape: str, color: str, config: SceneConfig) -> bool:
    return config.held_out == "require" or (shape, color) not in HELD_OUT_PAIRS


def sample_scene(rng: np.random.Generator, config: SceneConfig = SceneConfig()) -> Scene:
    """Draw a scene: 1–4 non-overlapping objects inside the image, on a background.

    The number of objects is drawn first and kept while placement is retried, so crowded
    scenes are as frequent as sparse ones.
    """
    count = int(rng.integers(config.min_objects, config.max_objects + 1))
    for _ in range(100):
        scene = _try_sample_scene(rng, config, count)
        if scene is not None:
            return scene
    raise RuntimeError(f"could not place {count} objects for {config}; lower max_objects or the scale")


def _try_sample_scene(rng: np.random.Generator, config: SceneConfig, count: int) -> Scene | None:
    pairs = [(s, c) for s in SHAPES for c in COLORS if allowed_pair(s, c, config)]
    held_out = sorted(HELD_OUT_PAIRS)
    scale = config.scale * config.size / _REFERENCE_SIZE
    objects: list[Object] = []
    for index in range(count):
        if config.held_out == "require" and index == 0:
            shape, color = held_out[rng.integers(len(held_out))]
        else:
            shape, color = pairs[rng.integers(len(pairs))]
        size = SIZES[rng.integers(len(SIZES))]
        low, high = RADII[size]
        r = float(rng.uniform(low, high)) * scale
        placed = place(rng, r, objects, config.size)
        if placed is None:
            return None
        jitter = rng.integers(-12, 13, size=3)
        rgb = tuple(int(v) for v in np.clip(np.array(COLORS[color]) + jitter, 0, 255))
        objects.append(Object(shape, color, size, placed[0], placed[1], round(r, 3), rgb))
    # The held-out object is drawn first but need not come first in the description.
    order = rng.permutation(len(objects))
    return Scene(config.size, sample_background(rng, config), tuple(objects[i] for i in order))


def place(rng: np.random.Generator, r: float, others: list[Object], size: int) -> tuple[float, float] | None:
    """A centre for an object of radius ``r`` clear of ``others`` and the border; None after 50 tries."""
    margin = EXTENT * r + 1.0
    for _ in range(50):
        cx, cy = (round(float(v), 3) for v in rng.uniform(margin, size - margin, size=2))
        if all(np.hypot(cx - o.cx, cy - o.cy) >= EXTENT * (r + o.r) + 2.0 for o in others):
            return cx, cy
    return None


def sample_background(rng: np.random.Generator, config: SceneConfig) -> Background:
    """One of ``config.backgrounds`` in neutral tones."""
    kind = config.backgrounds[rng.integers(len(config.backgrounds))]
    # Neutral, low-saturation tones, light or dark, so no background reads as an object colour.
    def neutral() -> tuple[int, int, int]:
        level = rng.choice([rng.uniform(25, 80), rng.uniform(160, 235)])
        tint = rng.integers(-10, 11, size=3)
        return tuple(int(v) for v in np.clip(level + tint, 0, 255))

    first, second = neutral(), neutral()
    return Background(
        kind=kind,
        rgb=first,
        rgb2=second,
        angle=round(float(rng.uniform(0, np.pi)), 4),
        period=round(float(rng.uniform(6, 12)), 3),
        noise_seed=int(rng.integers(2**31)),
    )


def object_mask(obj: Object, size: int) -> np.ndarray:
    """The exact pixel set of ``obj`` as a (size, size) bool array, from geometry alone."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5  # pixel centres
    dx, dy = x - obj.cx, y - obj.cy
    if obj.shape == "circle":
        return dx * dx + dy * dy <= obj.r * obj.r
    if obj.shape == "square":
        half = obj.r * 0.8  # same visual area as the circle, roughly
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if obj.shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= obj.r * 1.1
    if obj.shape == "triangle":
        # upward triangle inscribed in the circle of radius r, apex at the top
        top, base = -obj.r, obj.r * 0.6
        inside_height = (dy >= top) & (dy <= base)
        half_width = (dy - top) / (base - top) * obj.r * 0.95
        return inside_height & (np.abs(dx) <= half_width)
    raise ValueError(f"unknown shape {obj.shape!r}; expected one of {SHAPES}")


def render_background(background: Background, size: int) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    first, second = np.array(background.rgb, np.float64), np.array(background.rgb2, np.float64)
    along = (x * np.cos(background.angle) + y * np.sin(background.angle))
    if background.kind == "solid":
        pixels = np.broadcast_to(first, (size, size, 3)).copy()
    elif background.kind == "gradient":
        t = (along - along.min()) / max(along.max() - along.min(), 1e-9)
        pixels = first + t[..., None] * (second - first)
    elif background.kind == "noise":
        noise = np.random.default_rng(background.noise_seed).normal(0, 12, size=(size, size, 1))
        pixels = first + noise
    elif background.kind == "stripes":
        band = (np.floor(along / (background.period / 2)) % 2)[..., None]
        pixels = first + band * (second - first)
    else:
        raise ValueError(f"unknown background {background.kind!r}")
    return np.clip(np.round(pixels), 0, 255).astype(np.uint8)


def render(scene: Scene) -> tuple[np.ndarray, list[np.ndarray]]:
    """Pixels (H, W, 3) uint8 and one (H, W) bool mask per object, in the scene's order."""
    pixels = render_background(scene.background, scene.size)
    masks = [object_mask(obj, scene.size) for obj in scene.objects]
    for obj, mask in zip(scene.objects, masks):
        pixels[mask] = obj.rgb
    return pixels, masks

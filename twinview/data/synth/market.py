"""Synthetic pedestrian crops in the Market-1501 layout (``PPPP_cCsS_FFFFFF_BB.jpg``, 128x64 JPEG).

Each identity has fixed clothing and body parts: skin, hair (short or long), upper-body colour with a
pattern (plain, stripes, chest logo, two-tone, checks), sleeves, lower-body colour and kind (trousers,
shorts, skirt), shoes, bag (none, backpack, shoulder bag, hand bag) and body build. Colours come from a
small palette, so many identities share their dominant colours and differ only in pattern and parts:
matching needs more than mean colour; patterns are coarse enough to survive 64x32 inputs. Each of the
six cameras has its own colour cast, gamma, brightness, a wide scene of three textured areas that
people walk across (so the background varies within a camera, as in real footage), typical viewpoint
(front, back or side; the back hides the logo and shows the backpack), framing and occluders (poles,
bicycles, cars, passers-by). Every image adds pose (legs, arms), framing jitter, horizontal flips, blur
and sensor noise.

Splits follow the Market-1501 protocol: ``bounding_box_train/`` and the test identities are disjoint;
``query/`` holds one image per test identity and camera, ``bounding_box_test/`` (the gallery) the
rest of the test images plus distractor (``0000``) and junk (``-1``) boxes as in the full release.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from scipy import ndimage

RGB = tuple[int, int, int]

HEIGHT, WIDTH = 128, 64
_SS = 2  # draw at twice the resolution, then box-downsample (anti-aliasing)
_H, _W = HEIGHT * _SS, WIDTH * _SS
N_CAMERAS = 6
JPEG_QUALITY = 90

# Shared palettes: few dominant colours, so that many identities look alike in mean colour.
_UPPER = [(28, 28, 32), (225, 225, 220), (125, 125, 128), (35, 45, 95), (185, 40, 45), (60, 105, 180)]
_ACCENT = [(225, 225, 220), (28, 28, 32), (210, 185, 60), (50, 130, 70), (220, 140, 170), (185, 40, 45)]
_LOWER = [(30, 30, 35), (40, 50, 85), (70, 95, 140), (120, 120, 122), (195, 178, 140)]
_SKIN = [(235, 200, 170), (215, 170, 130), (180, 130, 95), (125, 85, 60)]
_HAIR = [(20, 18, 16), (60, 40, 25), (110, 80, 45), (150, 150, 150)]
_SHOES = [(25, 25, 25), (230, 230, 230), (90, 60, 40), (60, 60, 140)]
_PATTERNS = ("plain", "hstripes", "vstripes", "logo", "split", "check")
_BAGS = ("none", "none", "backpack", "shoulder", "hand")


@dataclass(frozen=True)
class _Size:
    train_ids: int
    test_ids: int
    distractors: int
    junk: int


_SIZES = {"small": _Size(16, 12, 6, 4), "medium": _Size(100, 50, 40, 20)}


@dataclass(frozen=True)
class Identity:
    """What stays the same for one person across cameras."""

    skin: RGB
    hair: RGB
    long_hair: bool
    upper: RGB
    accent: RGB
    pattern: str
    short_sleeves: bool
    lower: RGB
    lower_kind: str
    shoes: RGB
    bag: str
    bag_colour: RGB
    build: float  # body width factor
    stature: float  # height factor within the box


@dataclass(frozen=True)
class Camera:
    """What one camera does to every image it takes."""

    gain: np.ndarray  # per-channel colour cast
    gamma: float
    background: np.ndarray  # large uint8 RGB scene, cropped per image
    back_prob: float  # how often people are seen from the back
    side_prob: float
    occlusion: float  # probability of an occluder
    blur: float  # Gaussian blur radius (px)
    noise: float  # sensor noise std (grey levels)


@dataclass(frozen=True)
class _Shot:
    pid: int  # -1 junk, 0 distractor
    cam: int
    identity: Identity
    view: str  # front, back, side
    flip: bool


def write_market(out: Path, seed: int, size: str) -> dict[str, object]:
    """Write ``bounding_box_train/``, ``query/`` and ``bounding_box_test/`` into ``out``."""
    cfg = _SIZES[size]
    rng = np.random.default_rng(seed)
    cameras = [_camera(rng) for _ in range(N_CAMERAS)]
    pids = [int(p) for p in rng.choice(np.arange(1, 1502), cfg.train_ids + cfg.test_ids, replace=False)]
    train_pids, test_pids = sorted(pids[: cfg.train_ids]), sorted(pids[cfg.train_ids :])
    names: set[str] = set()
    counts = {"train_images": 0, "query_images": 0, "gallery_images": 0}
    for split in ("bounding_box_train", "query", "bounding_box_test"):
        (out / split).mkdir()
    for pid in train_pids:
        for shots in _tracks(rng, pid, cameras):
            for shot in shots:
                _save(rng, shot, cameras, out / "bounding_box_train", names)
                counts["train_images"] += 1
    for pid in test_pids:
        for shots in _tracks(rng, pid, cameras):
            query = int(rng.integers(len(shots)))
            for i, shot in enumerate(shots):
                split = "query" if i == query else "bounding_box_test"
                _save(rng, shot, cameras, out / split, names)
                counts["query_images" if i == query else "gallery_images"] += 1
    for pid, n in ((0, cfg.distractors), (-1, cfg.junk)):
        for _ in range(n):
            cam = int(rng.integers(1, N_CAMERAS + 1))
            shot = _Shot(pid, cam, _identity(rng), "front", bool(rng.random() < 0.5))
            _save(rng, shot, cameras, out / "bounding_box_test", names)
    return {
        "train_ids": len(train_pids),
        "test_ids": len(test_pids),
        **counts,
        "distractors": cfg.distractors,
        "junk": cfg.junk,
    }


def _tracks(rng: np.random.Generator, pid: int, cameras: list[Camera]) -> Iterator[list[_Shot]]:
    """One person seen by 2-6 cameras, 2-6 images per camera; view and walking direction per camera."""
    person = _identity(rng)
    n_cams = int(rng.choice([2, 3, 3, 4, 4, 5, 6]))
    for cam in sorted(int(c) for c in rng.choice(np.arange(1, N_CAMERAS + 1), n_cams, replace=False)):
        view = _view(rng, cameras[cam - 1])
        flip = bool(rng.random() < 0.5)
        shots = []
        for _ in range(int(rng.integers(2, 7))):
            turned = bool(rng.random() < 0.15)  # the person turns between frames
            shot_view = _view(rng, cameras[cam - 1]) if turned else view
            shots.append(_Shot(pid, cam, person, shot_view, flip ^ turned))
        yield shots


def _view(rng: np.random.Generator, cam: Camera) -> str:
    """Each camera sees people mostly from the front or mostly from the back, depending on where it looks."""
    roll = rng.random()
    return "side" if roll < cam.side_prob else "back" if rng.random() < cam.back_prob else "front"


def _pick(rng: np.random.Generator, palette: list[RGB], jitter: int = 12) -> RGB:
    """A palette colour with a little per-draw jitter."""
    base = np.array(palette[int(rng.integers(len(palette)))])
    r, g, b = (int(c) for c in np.clip(base + rng.integers(-jitter, jitter + 1, 3), 0, 255))
    return r, g, b


def _identity(rng: np.random.Generator) -> Identity:
    upper = _pick(rng, _UPPER)
    accent = _pick(rng, [c for c in _ACCENT if np.abs(np.subtract(c, upper)).sum() > 120])
    return Identity(
        skin=_pick(rng, _SKIN, 8),
        hair=_pick(rng, _HAIR, 8),
        long_hair=bool(rng.random() < 0.3),
        upper=upper,
        accent=accent,
        pattern=str(rng.choice(_PATTERNS)),
        short_sleeves=bool(rng.random() < 0.5),
        lower=_pick(rng, _LOWER),
        lower_kind=str(rng.choice(["trousers", "trousers", "shorts", "skirt"])),
        shoes=_pick(rng, _SHOES),
        bag=str(rng.choice(_BAGS)),
        bag_colour=_pick(rng, _UPPER + _ACCENT),
        build=float(rng.uniform(0.85, 1.2)),
        stature=float(rng.uniform(0.86, 0.96)),
    )


def _camera(rng: np.random.Generator) -> Camera:
    cast = rng.uniform(0.85, 1.15, 3)
    return Camera(
        gain=cast / cast.mean() * rng.uniform(0.75, 1.15),
        gamma=float(rng.uniform(0.8, 1.25)),
        background=np.concatenate([_background(rng) for _ in range(3)], axis=1),  # a wide, varied scene
        back_prob=float(rng.uniform(0.1, 0.9)),
        side_prob=float(rng.uniform(0.05, 0.25)),
        occlusion=float(rng.uniform(0.1, 0.4)),
        blur=float(rng.uniform(0.3, 1.0)),
        noise=float(rng.uniform(2.0, 7.0)),
    )


def _background(rng: np.random.Generator) -> np.ndarray:
    """A camera's scene: pavement tiles, grass, building wall or road, with smooth shading and noise."""
    h, w = _H + 64, _W * 4
    base = np.array(_pick(rng, [(150, 150, 145), (110, 140, 90), (170, 160, 140), (95, 95, 100)], 20), float)
    yy, xx = np.mgrid[0:h, 0:w]
    kind = int(rng.integers(4))
    period = int(rng.integers(16, 40))
    if kind == 0:  # tiles
        pattern = (
            (((yy // period) + (xx // period)) % 2) * 14.0
            - 7
            + ((yy % period < 2) | (xx % period < 2)) * -25.0
        )
    elif kind == 1:  # foliage
        pattern = ndimage.gaussian_filter(rng.normal(0, 60, (h, w)), 3)
    elif kind == 2:  # wall with windows
        pattern = ((xx % (2 * period) < period) & (yy % (3 * period) < 2 * period)) * -40.0
    else:  # road with a lane marking
        lane = np.abs(xx - w * rng.uniform(0.2, 0.8)) < 6
        pattern = lane * 90.0 + yy / h * 30.0
    shade = ndimage.gaussian_filter(rng.normal(0, 25, (h // 8, w // 8)), 2).repeat(8, 0).repeat(8, 1)
    texture = base + (pattern + shade + rng.normal(0, 6, (h, w)))[..., None]
    return np.clip(texture, 0, 255).astype(np.uint8)


def _save(
    rng: np.random.Generator, shot: _Shot, cameras: list[Camera], folder: Path, names: set[str]
) -> None:
    """Render one shot and write it under a fresh Market-1501 name."""
    image = _render(rng, shot, cameras[shot.cam - 1])
    while True:
        seq, frame, box = int(rng.integers(1, 7)), int(rng.integers(0, 200000)), int(rng.integers(1, 5))
        pid = "-1" if shot.pid < 0 else f"{shot.pid:04d}"
        name = f"{pid}_c{shot.cam}s{seq}_{frame:06d}_{box:02d}.jpg"
        if name not in names:
            break
    names.add(name)
    Image.fromarray(image).save(folder / name, format="JPEG", quality=JPEG_QUALITY)


def _render(rng: np.random.Generator, shot: _Shot, cam: Camera) -> np.ndarray:
    """Background crop, person, occluder, then the camera's colour response, blur and noise."""
    y0, x0 = (
        int(rng.integers(0, cam.background.shape[0] - _H)),
        int(rng.integers(0, cam.background.shape[1] - _W)),
    )
    canvas = Image.fromarray(cam.background[y0 : y0 + _H, x0 : x0 + _W])
    draw = ImageDraw.Draw(canvas)
    scale = rng.uniform(1.6, 2.4) if shot.pid == -1 else rng.uniform(0.92, 1.05)  # junk: body parts only
    if not (shot.pid == 0 and rng.random() < 0.4):  # some distractors are false detections: no person
        _draw_person(draw, canvas, shot.identity, shot.view, rng, scale)
    if rng.random() < cam.occlusion:
        _draw_occluder(draw, rng)
    if shot.flip:
        canvas = canvas.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    small = canvas.reduce(_SS).filter(ImageFilter.GaussianBlur(cam.blur))
    small = np.asarray(small, dtype=np.float32) / 255.0
    lit = np.power(np.clip(small * cam.gain * rng.uniform(0.9, 1.1), 0, 1), cam.gamma) * 255.0
    return np.clip(lit + rng.normal(0, cam.noise, lit.shape), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class _Figure:
    """Where a person is drawn (canvas pixels): centre, top, height, torso and limb half-widths."""

    cx: float
    top: float
    h: float
    half: float
    limb: float

    def y(self, fraction: float) -> float:
        """The canvas row at ``fraction`` of the body height from the top of the head."""
        return self.top + fraction * self.h


def _draw_person(
    draw: ImageDraw.ImageDraw,
    canvas: Image.Image,
    p: Identity,
    view: str,
    rng: np.random.Generator,
    scale: float,
) -> None:
    """Draw a walking person, centred with jitter; ``scale`` > 1 crops it (junk boxes show parts)."""
    h = _H * p.stature * scale
    top = _H * (1 - p.stature) / 2 + rng.normal(0, 4) - (h - _H * p.stature) * rng.uniform(0, 1)
    half = h * 0.14 * p.build * (0.65 if view == "side" else 1.0)
    fig = _Figure(_W / 2 + rng.normal(0, 4), top, h, half, h * 0.045)
    if p.long_hair and view == "back":
        draw.rectangle([fig.cx - h * 0.06, fig.y(0.03), fig.cx + h * 0.06, fig.y(0.24)], fill=p.hair)
    if p.bag == "backpack" and view == "front":  # seen behind the body
        draw.rectangle(
            [fig.cx - half * 1.2, fig.y(0.16), fig.cx + half * 1.2, fig.y(0.42)], fill=p.bag_colour
        )
    _draw_legs(draw, p, fig, phase=rng.uniform(-1, 1))
    _draw_arms(draw, p, fig, swing=rng.uniform(-1, 1))
    _draw_torso(canvas, p, view, fig)
    _draw_bag(draw, p, view, fig)
    _draw_head(draw, p, view, fig)


def _draw_legs(draw: ImageDraw.ImageDraw, p: Identity, fig: _Figure, phase: float) -> None:
    """Legs in stride (``phase`` in [-1, 1]), clothed by trousers, shorts or a skirt, and shoes."""
    cx, half, limb = fig.cx, fig.half, fig.limb
    for side in (-1, 1):
        hip, foot = cx + side * half * 0.45, cx + side * (half * 0.35 + phase * fig.h * 0.07)
        leg = [
            (hip - limb, fig.y(0.5)),
            (hip + limb, fig.y(0.5)),
            (foot + limb, fig.y(0.93)),
            (foot - limb, fig.y(0.93)),
        ]
        draw.polygon(leg, fill=p.lower if p.lower_kind == "trousers" else p.skin)
        if p.lower_kind == "shorts":
            knee = (hip + foot) / 2
            draw.polygon([leg[0], leg[1], (knee + limb, fig.y(0.7)), (knee - limb, fig.y(0.7))], fill=p.lower)
        draw.ellipse([foot - limb * 1.4, fig.y(0.91), foot + limb * 1.6, fig.y(0.97)], fill=p.shoes)
    if p.lower_kind == "skirt":
        hem = [(cx + half * 1.4, fig.y(0.72)), (cx - half * 1.4, fig.y(0.72))]
        draw.polygon([(cx - half, fig.y(0.48)), (cx + half, fig.y(0.48)), *hem], fill=p.lower)
    else:
        draw.rectangle([cx - half, fig.y(0.47), cx + half, fig.y(0.56)], fill=p.lower)


def _draw_arms(draw: ImageDraw.ImageDraw, p: Identity, fig: _Figure, swing: float) -> None:
    """Arms swinging by ``swing`` in [-1, 1]: skin, then the sleeve (short or long), and a hand bag."""
    cx, half, limb = fig.cx, fig.half, fig.limb
    for side in (-1, 1):
        shoulder, hand = cx + side * half * 1.05, cx + side * half * 1.2 - side * swing * fig.h * 0.04
        arm = [(shoulder - limb, fig.y(0.16)), (shoulder + limb, fig.y(0.16))]
        draw.polygon([*arm, (hand + limb, fig.y(0.5)), (hand - limb, fig.y(0.5))], fill=p.skin)
        cuff_x = (shoulder + hand) / 2 if p.short_sleeves else hand
        cuff_y = fig.y(0.27) if p.short_sleeves else fig.y(0.47)
        draw.polygon([*arm, (cuff_x + limb, cuff_y), (cuff_x - limb, cuff_y)], fill=p.upper)
        if p.bag == "hand" and side == 1:
            draw.rectangle([hand - limb * 1.5, fig.y(0.47), hand + limb * 1.8, fig.y(0.6)], fill=p.bag_colour)


def _draw_torso(canvas: Image.Image, p: Identity, view: str, fig: _Figure) -> None:
    """Paste the patterned upper body through a trapezoid mask; the chest logo only shows from the front."""
    x0, y0 = round(fig.cx - fig.half), round(fig.y(0.15))
    tw, th = max(round(fig.cx + fig.half) - x0, 2), max(round(fig.y(0.5)) - y0, 2)
    yy, xx = np.mgrid[0:th, 0:tw]
    period = max(int(fig.h * 0.07), 6)  # stripes 2 px wide or more at 64x32
    accent = {
        "plain": np.zeros((th, tw), bool),
        "hstripes": (yy // period) % 2 == 1,
        "vstripes": (xx // period) % 2 == 1,
        "logo": (np.abs(xx - tw / 2) < tw * 0.3) & (np.abs(yy - th * 0.35) < th * 0.2) & (view == "front"),
        "split": xx > tw / 2,
        "check": ((yy // period) + (xx // period)) % 2 == 1,
    }[p.pattern]
    colours = np.where(accent[..., None], np.array(p.accent), np.array(p.upper)).astype(np.uint8)
    mask = Image.new("L", (tw, th), 0)
    inset = tw * 0.08
    ImageDraw.Draw(mask).polygon([(0, 0), (tw - 1, 0), (tw - 1 - inset, th - 1), (inset, th - 1)], fill=255)
    canvas.paste(Image.fromarray(colours), (x0, y0), mask)


def _draw_bag(draw: ImageDraw.ImageDraw, p: Identity, view: str, fig: _Figure) -> None:
    """Backpack (whole from the back or side, straps from the front) or shoulder bag with its strap."""
    cx, half = fig.cx, fig.half
    strap = max(2, int(fig.h * 0.015))
    if p.bag == "backpack" and view == "front":
        for side in (-1, 1):
            top, bottom = (cx + side * half * 0.6, fig.y(0.15)), (cx + side * half * 0.55, fig.y(0.38))
            draw.line([top, bottom], fill=p.bag_colour, width=strap)
    elif p.bag == "backpack":
        w = half * (0.8 if view == "back" else 0.5)
        off = 0 if view == "back" else -half * 0.9
        box = [cx + off - w, fig.y(0.17), cx + off + w, fig.y(0.43)]
        draw.rounded_rectangle(box, radius=fig.h * 0.02, fill=p.bag_colour)
    elif p.bag == "shoulder":
        draw.line([(cx - half * 0.8, fig.y(0.15)), (cx + half, fig.y(0.44))], fill=p.bag_colour, width=strap)
        draw.rectangle([cx + half * 0.8, fig.y(0.4), cx + half * 1.5, fig.y(0.52)], fill=p.bag_colour)


def _draw_head(draw: ImageDraw.ImageDraw, p: Identity, view: str, fig: _Figure) -> None:
    """Neck and head: from the front a face under a hair cap (long hair at the sides), from the back hair."""
    cx, r = fig.cx, fig.h * 0.058
    draw.rectangle([cx - fig.h * 0.02, fig.y(0.11), cx + fig.h * 0.02, fig.y(0.16)], fill=p.skin)
    head = [cx - r, fig.y(0.005), cx + r, fig.y(0.005) + 2.2 * r]
    draw.ellipse(head, fill=p.hair if view == "back" else p.skin)
    if view != "back":
        draw.chord([head[0], head[1], head[2], head[3] - r * 0.8], 180, 360, fill=p.hair)
        if p.long_hair:
            draw.rectangle([cx - r * 1.05, fig.y(0.04), cx - r * 0.7, fig.y(0.2)], fill=p.hair)
            draw.rectangle([cx + r * 0.7, fig.y(0.04), cx + r * 1.05, fig.y(0.2)], fill=p.hair)


def _draw_occluder(draw: ImageDraw.ImageDraw, rng: np.random.Generator) -> None:
    """A pole, a bicycle wheel, a car bonnet or a passer-by's edge in front of the person."""
    kind = int(rng.integers(4))
    colour = _pick(rng, _UPPER + _LOWER, 30)
    if kind == 0:
        x = rng.uniform(0, _W)
        draw.rectangle([x, 0, x + rng.uniform(4, 12), _H], fill=colour)
    elif kind == 1:
        cx, cy, r = rng.uniform(0, _W), rng.uniform(_H * 0.65, _H * 0.9), rng.uniform(20, 35)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=colour, width=4)
    elif kind == 2:
        top = rng.uniform(_H * 0.65, _H * 0.85)
        draw.rounded_rectangle([-10, top, _W + 10, _H + 10], radius=12, fill=colour)
    else:
        left = bool(rng.random() < 0.5)
        edge = rng.uniform(0.15, 0.3) * _W
        draw.rectangle(
            [0, rng.uniform(0, 40), edge, _H] if left else [_W - edge, rng.uniform(0, 40), _W, _H],
            fill=colour,
        )

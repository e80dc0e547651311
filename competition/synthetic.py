"""A synthetic data set in the exact Carvana format: studio photos of cars on a turntable, 16 views each.

    python -m competition.synthetic --out input/ --cars 24 --test-cars 8 --width 1918 --height 1280 --seed 0 [--zip]

Each car is a 3-D body (an extruded side profile that narrows towards the roof, wheels,
mirrors, sometimes an antenna) rendered in perspective from 16 evenly spaced yaw angles in
a studio scene (wall gradient, floor, turntable, soft shadow), then blurred, lit with
jitter, noised and JPEG-compressed. The mask is the union of the same polygons, so it is
exact. The real data is under Kaggle's licence; this lets every command and test run.
``--parts`` labels each pixel by part (multi-class); ``--multilabel`` writes overlapping labels (car, glass,
shadow) as per-class RLE rows, the way UW-Madison GI Tract ships its masks.
"""

import io
import math
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from joblib import Parallel, delayed
from PIL import Image

from competition.files import atomic_output, check_writable, partial_path
from competition.logs import OneLineParser, exit_on_project_error
from competition.rle import rle_encode

VIEWS = 16
# The classes of the multi-class (``--parts``) data set, background first; a part's index is its mask value.
PARTS = ("background", "body", "glass", "wheels", "lights")
BODY, GLASS, WHEELS, LIGHTS = range(1, 5)
# The overlapping labels of the multi-label (``--multilabel``) set, in train.csv's order: the whole car, its
# windows (inside the car) and the hard shadow a low lamp throws (under the car, over its lower edge), which
# the lamp, lit in about SHADOW_SHARE of the views, leaves out of most images: the rare, sparse class.
LABELS = ("car", "glass", "shadow")
SHADOW_SHARE = 0.3
# Mask colours of the parts' palette PNGs (any viewer shows them; the values are the class indices).
PART_COLOURS = ((0, 0, 0), (200, 60, 60), (60, 140, 220), (70, 70, 70), (250, 210, 40))
_SUBPIXEL = 4  # cv2 polygon coordinates carry 4 fractional bits
_COLOURS = {  # name -> RGB; white, silver and black, and a grey close to the studio wall
    "white": (236, 236, 234),
    "silver": (178, 181, 185),
    "black": (24, 25, 28),
    "studio grey": (200, 200, 198),
    "red": (160, 24, 28),
    "blue": (28, 60, 140),
    "dark green": (28, 70, 45),
    "beige": (196, 180, 150),
    "graphite": (80, 82, 86),
    "yellow": (220, 180, 40),
}
_MAKES = {
    "Acura": ["MDX", "TLX"],
    "BMW": ["3 Series", "X5"],
    "Ford": ["Focus", "F-150"],
    "Honda": ["Civic", "CR-V"],
    "Toyota": ["Camry", "RAV4"],
    "Volkswagen": ["Golf", "Jetta"],
}


@dataclass
class Car:
    """One car's shape and look, in metres; x along the car (front positive), z up."""

    profile: np.ndarray  # (P, 2) side outline (x, z), counter-clockwise
    glass: np.ndarray  # (P,) bool: edge i (profile[i] -> profile[i+1]) is glass
    half_width: np.ndarray  # (P,) half width at each profile point (narrower at the roof)
    window: np.ndarray  # (Q, 2) side-window outline (x, z)
    wheel_x: tuple[float, float]
    wheel_radius: float
    colour: np.ndarray
    antenna: float  # 0 for none, else its height
    mirror: bool


def make_car(rng: np.random.Generator) -> Car:
    length = rng.uniform(3.9, 5.0)
    style = rng.choice(["sedan", "hatchback", "suv", "pickup"])
    clearance = rng.uniform(0.14, 0.22) + (0.08 if style in ("suv", "pickup") else 0.0)
    belt = clearance + rng.uniform(0.55, 0.7) + (0.15 if style in ("suv", "pickup") else 0.0)
    roof = belt + rng.uniform(0.42, 0.55)
    front, rear = length / 2, -length / 2
    hood = front - rng.uniform(0.8, 1.3)
    roof_front = hood - rng.uniform(0.6, 0.9)
    if style == "sedan":
        roof_rear = roof_front - rng.uniform(1.0, 1.4)
        deck = rear + rng.uniform(0.5, 0.8)
        upper = [
            (front, belt - 0.1),
            (hood, belt),
            (roof_front, roof),
            (roof_rear, roof),
            (deck, belt + 0.05),
            (rear, belt),
        ]
        glass_edges = [1, 3]
    elif style == "hatchback":
        roof_rear = rear + rng.uniform(0.35, 0.6)
        upper = [(front, belt - 0.1), (hood, belt), (roof_front, roof), (roof_rear, roof), (rear, belt + 0.05)]
        glass_edges = [1, 3]
    elif style == "suv":
        roof_rear = rear + rng.uniform(0.15, 0.3)
        upper = [
            (front, belt - 0.05),
            (hood, belt),
            (roof_front, roof),
            (roof_rear, roof),
            (rear, roof - 0.1),
            (rear, belt),
        ]
        glass_edges = [1, 4]
    else:
        cab_rear = roof_front - rng.uniform(0.9, 1.2)
        upper = [
            (front, belt - 0.05),
            (hood, belt),
            (roof_front, roof),
            (cab_rear, roof),
            (cab_rear, belt + 0.05),
            (rear, belt + 0.05),
        ]
        glass_edges = [1, 3]
    profile = [(rear, clearance), (front - 0.1, clearance), (front, clearance + 0.2)]
    glass_offset = len(profile)
    profile = np.array(profile + upper, dtype=np.float64)
    glass = np.zeros(len(profile), dtype=bool)
    glass[[glass_offset + edge for edge in glass_edges]] = True
    half = rng.uniform(0.85, 0.98)
    narrowing = np.clip((profile[:, 1] - belt) / (roof - belt), 0, 1) * rng.uniform(0.12, 0.22)
    window_top = roof - 0.06
    window_bottom = belt + 0.05
    window = np.array(
        [
            (hood - 0.12, window_bottom),
            (roof_front - 0.08, window_top),
            (min(upper[3][0], roof_front - 0.5) + 0.1, window_top),
            (min(upper[3][0], roof_front - 0.5), window_bottom),
        ]
    )
    wheel_radius = rng.uniform(0.3, 0.38) + (0.04 if style in ("suv", "pickup") else 0.0)
    wheel_x = (front - rng.uniform(0.75, 0.95), rear + rng.uniform(0.75, 1.0))
    colour = np.array(_COLOURS[rng.choice(list(_COLOURS))], dtype=np.float64)
    antenna = rng.uniform(0.25, 0.5) if rng.random() < 0.35 else 0.0
    return Car(
        profile, glass, half * (1 - narrowing), window, wheel_x, wheel_radius, colour, antenna, rng.random() < 0.7
    )


class _Camera:
    """Perspective projection of a car turned by ``yaw`` on a turntable, seen slightly from above."""

    def __init__(self, yaw: float, width: int, height: int, distance: float, elevation: float):
        self.cos_yaw, self.sin_yaw = np.cos(yaw), np.sin(yaw)
        self.cos_el, self.sin_el = np.cos(elevation), np.sin(elevation)
        self.distance = distance
        self.focal = width * 1.4
        self.centre = (width / 2, height * 0.58)

    def turn(self, points: np.ndarray) -> np.ndarray:
        x, y, z = points[..., 0], points[..., 1], points[..., 2]
        return np.stack([x * self.cos_yaw - y * self.sin_yaw, x * self.sin_yaw + y * self.cos_yaw, z], axis=-1)

    def turn_back(self, turned: np.ndarray) -> np.ndarray:
        """The inverse of ``turn``: a direction fixed in the studio, in the car's coordinates."""
        x, y, z = turned[..., 0], turned[..., 1], turned[..., 2]
        return np.stack([x * self.cos_yaw + y * self.sin_yaw, -x * self.sin_yaw + y * self.cos_yaw, z], axis=-1)

    def depth(self, turned: np.ndarray) -> np.ndarray:
        return self.distance + turned[..., 1] * self.cos_el - (turned[..., 2] - 0.7) * self.sin_el

    def project(self, points: np.ndarray) -> np.ndarray:
        turned = self.turn(points)
        depth = self.depth(turned)
        up = (turned[..., 2] - 0.7) * self.cos_el + turned[..., 1] * self.sin_el
        u = self.centre[0] + self.focal * turned[..., 0] / depth
        v = self.centre[1] - self.focal * up / depth
        return np.stack([u, v], axis=-1)


def _fixed(points: np.ndarray) -> np.ndarray:
    return np.round(points * (1 << _SUBPIXEL)).astype(np.int32)


class _Canvas:
    """Draws each car part into the image and its part's class into the same pixels of the mask: the
    visible part wins, as in the photo. Carvana's mask is every pixel of any part."""

    def __init__(self, image: np.ndarray, mask: np.ndarray):
        self.image, self.mask = image, mask

    def polygon(self, points: np.ndarray, colour, part: int) -> None:
        fixed = [_fixed(points)]
        cv2.fillPoly(self.image, fixed, tuple(float(c) for c in colour), cv2.LINE_8, _SUBPIXEL)
        cv2.fillPoly(self.mask, fixed, part, cv2.LINE_8, _SUBPIXEL)

    def line(self, start: np.ndarray, end: np.ndarray, colour, thickness: int, part: int) -> None:
        a, b = tuple(int(v) for v in _fixed(start)), tuple(int(v) for v in _fixed(end))
        cv2.line(self.image, a, b, tuple(float(c) for c in colour), thickness, cv2.LINE_8, _SUBPIXEL)
        cv2.line(self.mask, a, b, part, thickness, cv2.LINE_8, _SUBPIXEL)


def _studio(width: int, height: int, rng: np.random.Generator, camera: _Camera) -> np.ndarray:
    """Wall gradient, floor and turntable."""
    horizon = int(height * rng.uniform(0.42, 0.5))
    wall_top, wall_bottom = rng.uniform(205, 235), rng.uniform(185, 215)
    floor_near, floor_far = rng.uniform(150, 185), rng.uniform(170, 200)
    rows = np.empty(height, dtype=np.float32)
    rows[:horizon] = np.linspace(wall_top, wall_bottom, horizon)
    rows[horizon:] = np.linspace(floor_far, floor_near, height - horizon)
    tint = np.array([1.0, 1.0, 1.0 + rng.uniform(-0.03, 0.03)], dtype=np.float32)
    image = np.ascontiguousarray(np.broadcast_to(rows[:, None, None] * tint, (height, width, 3)))
    angles = np.linspace(0, 2 * np.pi, 72, endpoint=False)
    turntable = np.stack([3.1 * np.cos(angles), 3.1 * np.sin(angles), np.zeros_like(angles)], axis=-1)
    shade = float(rng.uniform(0.9, 1.05))
    cv2.fillPoly(image, [_fixed(camera.project(turntable))], (0.9 * shade * floor_near,) * 3, cv2.LINE_8, _SUBPIXEL)
    return image


def _shadow(image: np.ndarray, car: Car, camera: _Camera) -> None:
    """A soft dark footprint under the car, blurred at low resolution for speed."""
    height, width = image.shape[:2]
    x, half = np.abs(car.profile[:, 0]).max() + 0.15, car.half_width.max() + 0.2
    footprint = np.array([[x, -half, 0], [x, half, 0], [-x, half, 0], [-x, -half, 0]])
    scale = 8
    small = np.zeros((height // scale + 1, width // scale + 1), dtype=np.float32)
    cv2.fillPoly(small, [_fixed(camera.project(footprint) / scale)], 1.0, cv2.LINE_8, _SUBPIXEL)
    small = cv2.GaussianBlur(small, (0, 0), 6)
    darkening = 1 - 0.55 * cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)[:height, :width]
    image *= darkening[..., None]


def _shaded(colour: np.ndarray, normal: np.ndarray, light: np.ndarray, gloss: float = 0.25) -> np.ndarray:
    diffuse = 0.45 + 0.55 * max(0.0, float(normal @ light))
    return np.clip(colour * diffuse + 255 * gloss * max(0.0, float(normal @ light)) ** 8, 0, 255)


def render(
    car: Car, yaw: float, width: int, height: int, rng: np.random.Generator, studio_seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """One studio photo (RGB uint8) of ``car`` turned by ``yaw``, and its exact mask of PARTS indices.

    ``studio_seed`` fixes the studio and camera, the same for all views of a car; ``rng``
    draws what changes from shot to shot (exposure, noise).
    """
    image, mask, _ = render_scene(car, yaw, width, height, rng, studio_seed)
    return image, mask


def render_scene(
    car: Car,
    yaw: float,
    width: int,
    height: int,
    rng: np.random.Generator,
    studio_seed: int = 0,
    spotlight: tuple[float, float] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``render``'s photo and PARTS mask, and with ``spotlight`` (where a low lamp throws the car's shadow on the
    floor: metres right and towards the camera) that hard shadow drawn and its 0/1 mask; else None. The lamp
    draws nothing from ``rng``, so the photo of an unlit view is ``render``'s."""
    studio = np.random.default_rng(studio_seed)
    camera = _Camera(yaw, width, height, distance=studio.uniform(8.5, 9.5), elevation=np.deg2rad(studio.uniform(8, 14)))
    image = _studio(width, height, studio, camera)
    _shadow(image, car, camera)
    cast = None if spotlight is None else _cast_shadow(image, car, camera, spotlight)
    mask = np.zeros((height, width), dtype=np.uint8)
    canvas = _Canvas(image, mask)
    light = np.array([0.3, -0.6, 0.75])
    light /= np.linalg.norm(light)
    view = np.array([0.0, -camera.cos_el, camera.sin_el])  # towards the camera, in turned coordinates
    sides = {side: np.column_stack([car.profile[:, 0], side * car.half_width, car.profile[:, 1]]) for side in (-1, 1)}
    tyre, rim = np.array([22.0, 22, 24]), np.array([150.0, 152, 155])
    glass_colour = np.array([35.0, 40, 48])

    def wheels(side: int) -> None:
        angles = np.linspace(0, 2 * np.pi, 40, endpoint=False)
        for x in car.wheel_x:
            for radius, colour in ((car.wheel_radius, tyre), (car.wheel_radius * 0.6, rim)):
                circle = np.column_stack(
                    [
                        x + radius * np.cos(angles),
                        np.full_like(angles, side * (car.half_width[0] + 0.02)),
                        car.wheel_radius + radius * np.sin(angles),
                    ]
                )
                canvas.polygon(camera.project(circle), colour, WHEELS)

    near_side = 1 if camera.turn(np.array([0.0, 1.0, 0.0]))[1] < 0 else -1
    wheels(-near_side)
    # Faces of the closed body, far first (painter's algorithm), back faces culled.
    faces = []
    for side, points in sides.items():
        normal = camera.turn(np.array([0.0, side, 0.0]))
        faces.append((points, normal, "side", side))
    count = len(car.profile)
    for i in range(count):
        j = (i + 1) % count
        quad = np.array([sides[-1][i], sides[-1][j], sides[1][j], sides[1][i]])
        edge = car.profile[j] - car.profile[i]
        normal = camera.turn(np.array([edge[1], 0.0, -edge[0]]) / (np.linalg.norm(edge) + 1e-9))
        lamps = {2: "front", count - 1: "rear"}.get(i)  # the vertical faces under the bonnet and the boot
        faces.append((quad, normal, "glass" if car.glass[i] else lamps or "body", i))
    faces.sort(key=lambda face: -float(camera.depth(camera.turn(face[0])).mean()))
    for points, normal, kind, detail in faces:
        if normal @ view <= 0:
            continue
        colour = glass_colour if kind == "glass" else car.colour
        canvas.polygon(
            camera.project(points),
            _shaded(colour, normal, light, 0.5 if kind == "glass" else 0.25),
            GLASS if kind == "glass" else BODY,
        )
        if kind in ("front", "rear"):
            _lamps(canvas, camera, car, detail, (236, 236, 226) if kind == "front" else (175, 22, 24))
        if kind == "side":
            side = detail
            window = np.column_stack(
                [car.window[:, 0], np.full(len(car.window), side * 0.99 * car.half_width.min()), car.window[:, 1]]
            )
            window_2d = camera.project(window)
            canvas.polygon(window_2d, _shaded(glass_colour, normal, light, 0.6), GLASS)
            streak = window_2d[[0, 1]] * 0.5 + window_2d[[3, 2]] * 0.5
            canvas.line(streak[0], streak[1], np.minimum(glass_colour + 90, 255), max(1, width // 600), GLASS)
    wheels(near_side)
    if car.mirror:
        base_x, base_z = car.window[0]
        for side in (-1, 1):
            y = side * car.half_width.max()
            mirror = np.array(
                [
                    [base_x, y, base_z],
                    [base_x - 0.15, y, base_z],
                    [base_x - 0.12, y + side * 0.2, base_z + 0.12],
                    [base_x - 0.02, y + side * 0.2, base_z + 0.12],
                ]
            )
            canvas.polygon(camera.project(mirror), _shaded(car.colour, camera.turn(np.array([1.0, 0, 0])), light), BODY)
    if car.antenna:
        roof = car.profile[np.argmax(car.profile[:, 1])]
        base = np.array([roof[0] - 0.3, 0.0, roof[1]])
        tip = base + np.array([-0.15, 0.0, car.antenna])
        canvas.line(camera.project(base), camera.project(tip), (30, 30, 30), int(rng.integers(1, 4)), BODY)
    shadow = None if cast is None else _shadow_label(cast, mask)
    return _photograph(image, rng), mask, shadow


def _cast_shadow(image: np.ndarray, car: Car, camera: _Camera, spotlight: tuple[float, float]) -> np.ndarray:
    """Darkens the floor where a low lamp throws the car's shadow (the hull of its footprint and the footprint
    moved by ``spotlight``, a distance fixed in the studio), with a narrow penumbra; returns the hull's 0/1 mask."""
    length, half = np.abs(car.profile[:, 0]).max() + 0.05, car.half_width.max()
    footprint = np.array([[length, -half, 0], [length, half, 0], [-length, half, 0], [-length, -half, 0]])
    # Towards the camera is -y in turned coordinates.
    shift = camera.turn_back(np.array([spotlight[0], -spotlight[1], 0.0]))
    corners = camera.project(np.concatenate([footprint, footprint + shift])).astype(np.float32)
    cast = np.zeros(image.shape[:2], dtype=np.uint8)
    cv2.fillPoly(cast, [_fixed(cv2.convexHull(corners)[:, 0])], 1, cv2.LINE_8, _SUBPIXEL)
    penumbra = cv2.GaussianBlur(cast.astype(np.float32), (0, 0), 1.0)
    image *= (1 - 0.5 * penumbra)[..., None]
    return cast


def _shadow_label(cast: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The shadow's label: the floor it darkens, and a band of the car's lower edge next to it (a few pixels
    wide), so that it overlaps the car's label as UW-Madison's organs overlap; the hidden rest is left out."""
    band = max(2, mask.shape[1] // 96)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * band + 1, 2 * band + 1))
    seen = cast & (mask == 0)
    return cast & cv2.dilate(seen, kernel)


def _lamps(canvas: _Canvas, camera: _Camera, car: Car, edge: int, colour) -> None:
    """Head- or tail-lamps near the top corners of the vertical face on profile edge ``edge``."""
    start, end = car.profile[edge], car.profile[(edge + 1) % len(car.profile)]
    x, top = (start[0] + end[0]) / 2, max(start[1], end[1])
    half = min(car.half_width[edge], car.half_width[(edge + 1) % len(car.profile)])
    for side in (-1, 1):
        inner, outer = side * (half - 0.4), side * (half - 0.08)
        lamp = np.array(
            [[x, inner, top - 0.05], [x, outer, top - 0.05], [x, outer, top - 0.17], [x, inner, top - 0.17]]
        )
        canvas.polygon(camera.project(lamp), colour, LIGHTS)


def _photograph(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Optics blur, exposure and white-balance jitter, sensor noise."""
    image = cv2.GaussianBlur(image, (0, 0), 0.7)
    image *= rng.uniform(0.95, 1.05) * (1 + rng.uniform(-0.015, 0.015, size=3)).astype(np.float32)
    image += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(rng.uniform(1.5, 4.0))
    return np.clip(image, 0, 255).astype(np.uint8)


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return data.tobytes()


def encode_gif(mask: np.ndarray) -> bytes:
    """The competition's mask GIFs: palette image, index 0 black background, index 1 white car."""
    gif = Image.fromarray(mask.astype(np.uint8), mode="P")
    gif.putpalette([0, 0, 0, 255, 255, 255] + [0, 0, 0] * 254)
    buffer = io.BytesIO()
    gif.save(buffer, format="GIF")
    return buffer.getvalue()


def render_car(
    car_seed: int, width: int, height: int, parts: bool = False, shadow_share: float | None = None
) -> list[tuple[bytes, np.ndarray]]:
    """The 16 views of one car: (JPEG bytes, mask) each, the mask 0/1 (car) or, with ``parts``, PARTS
    indices; with ``shadow_share``, a (3, H, W) 0/1 stack of the overlapping LABELS, the lamp that throws the
    shadow lit in about that share of the views. Deterministic for ``car_seed``."""
    rng = np.random.default_rng(car_seed)
    car = make_car(rng)
    start = rng.uniform(0, 2 * np.pi / VIEWS)
    studio_seed = int(rng.integers(2**31))
    # The lamp has a generator of its own: the car and its photos stay those of the other sets of the same seed.
    lamp = np.random.default_rng(np.random.SeedSequence(car_seed, spawn_key=(1,)))
    angle, reach = lamp.uniform(np.deg2rad(25), np.deg2rad(155)), lamp.uniform(0.8, 1.3)
    views = []
    for view in range(VIEWS):
        lit = shadow_share is not None and lamp.random() < shadow_share
        spotlight = (reach * np.cos(angle), reach * np.sin(angle)) if lit else None
        image, mask, shadow = render_scene(
            car, start + 2 * np.pi * view / VIEWS, width, height, rng, studio_seed, spotlight
        )
        if shadow_share is not None:
            mask = np.stack([mask > 0, mask == GLASS, np.zeros_like(mask) if shadow is None else shadow])
            mask = mask.astype(np.uint8)
        elif not parts:
            mask = (mask > 0).astype(np.uint8)
        views.append((encode_jpeg(image, int(rng.integers(85, 96))), mask))
    return views


class _Writer:
    """Writes the layout as folders, or as the competition's zip archives (``<folder>.zip``)."""

    def __init__(self, out: Path, as_zip: bool):
        self.out, self.as_zip = out, as_zip
        self.archives: dict[str, zipfile.ZipFile] = {}

    def file(self, folder: str, name: str, data: bytes) -> None:
        if self.as_zip:
            if folder not in self.archives:
                partial = partial_path(self.out / f"{folder}.zip")
                self.archives[folder] = zipfile.ZipFile(partial, "w", zipfile.ZIP_STORED)
            self.archives[folder].writestr(f"{folder}/{name}", data)
        else:
            (self.out / folder).mkdir(parents=True, exist_ok=True)
            with atomic_output(self.out / folder / name) as partial:
                partial.write_bytes(data)

    def csv(self, name: str, frame: pd.DataFrame) -> None:
        if self.as_zip:
            with atomic_output(self.out / f"{name}.zip") as partial, zipfile.ZipFile(partial, "w") as archive:
                archive.writestr(name, frame.to_csv(index=False), zipfile.ZIP_DEFLATED)
        else:
            with atomic_output(self.out / name) as partial:
                frame.to_csv(partial, index=False)

    def close(self) -> None:
        for folder, archive in self.archives.items():
            archive.close()
            os.replace(partial_path(self.out / f"{folder}.zip"), self.out / f"{folder}.zip")


def contact_sheet(views: list[tuple[bytes, np.ndarray]], path: Path, columns: int = 4) -> None:
    """One car's views in a grid, mask outlines drawn in green, saved as PNG."""
    tiles = []
    for jpeg, mask in views:
        image = cv2.cvtColor(cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        contours, _ = cv2.findContours(mask, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(image, contours, -1, (0, 220, 0), max(1, image.shape[1] // 400))
        scale = 480 / image.shape[1]
        tiles.append(cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA))
    rows = [np.hstack(tiles[i : i + columns]) for i in range(0, len(tiles), columns)]
    with atomic_output(path) as partial:
        Image.fromarray(np.vstack(rows)).save(partial, format="PNG")


def _cars(seed: int, count: int) -> tuple[np.ndarray, list[str], np.random.Generator]:
    """(a seed per car, a distinct 12-hex-digit Carvana id per car, the generator that named them: it draws the
    metadata next) for ``count`` cars; the same for every set of one ``seed``."""
    seeds = np.random.SeedSequence(seed).generate_state(count + 1)
    naming = np.random.default_rng(seeds[-1])
    car_ids: list[str] = []
    while len(car_ids) < count:
        car_id = naming.bytes(6).hex()
        if car_id not in car_ids:
            car_ids.append(car_id)
    return seeds[:-1], car_ids, naming


def generate(
    out: str | Path,
    cars: int = 24,
    test_cars: int = 8,
    width: int = 1918,
    height: int = 1280,
    seed: int = 0,
    as_zip: bool = False,
    jobs: int = -1,
) -> Path:
    """Write a full Carvana-format data set under ``out``; returns ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("train", "train_masks", "test"):
        shutil.rmtree(out / stale, ignore_errors=True)
        (out / f"{stale}.zip").unlink(missing_ok=True)
    seeds, car_ids, naming = _cars(seed, cars + test_cars)
    writer = _Writer(out, as_zip)
    train_rows, test_rows, metadata = [], [], []
    renders = Parallel(n_jobs=jobs, return_as="generator")(
        delayed(render_car)(int(car_seed), width, height) for car_seed in seeds
    )
    for index, (car_id, views) in enumerate(zip(car_ids, renders)):
        is_test = index >= cars
        for view, (jpeg, mask) in enumerate(views, start=1):
            name = f"{car_id}_{view:02d}"
            writer.file("test" if is_test else "train", f"{name}.jpg", jpeg)
            (test_rows if is_test else train_rows).append((f"{name}.jpg", rle_encode(mask)))
            if not is_test:
                writer.file("train_masks", f"{name}_mask.gif", encode_gif(mask))
        make = naming.choice(sorted(_MAKES))
        metadata.append((car_id, str(naming.integers(2007, 2017)), make, naming.choice(_MAKES[make]), "", ""))
        if index == 0:
            contact_sheet(views, out / "contact_sheet.png")
    writer.close()
    train_rows, test_rows, metadata = sorted(train_rows), sorted(test_rows), sorted(metadata)
    columns = ["img", "rle_mask"]
    writer.csv("train_masks.csv", pd.DataFrame(train_rows, columns=columns))
    writer.csv("metadata.csv", pd.DataFrame(metadata, columns=["id", "year", "make", "model", "trim1", "trim2"]))
    writer.csv("sample_submission.csv", pd.DataFrame([(img, "1 1") for img, _ in test_rows], columns=columns))
    writer.csv("test_masks.csv", pd.DataFrame(test_rows, columns=columns))
    return out


def encode_part_png(mask: np.ndarray) -> bytes:
    """A parts mask as a palette PNG: the pixel values are the class indices, the palette shows them in colour."""
    png = Image.fromarray(mask.astype(np.uint8), mode="P")
    png.putpalette([value for colour in PART_COLOURS for value in colour] + [0, 0, 0] * (256 - len(PART_COLOURS)))
    buffer = io.BytesIO()
    png.save(buffer, format="PNG")
    return buffer.getvalue()


def generate_parts(
    out: str | Path,
    cars: int = 8,
    test_cars: int = 2,
    width: int = 240,
    height: int = 160,
    seed: int = 0,
    jobs: int = -1,
) -> Path:
    """Write the multi-class data set under ``out`` in the image/mask-folder layout: the same studio cars,
    each pixel labelled by part (PARTS); ``test_masks/`` holds the test truth for scoring. Returns ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("images", "masks", "test", "test_masks"):
        shutil.rmtree(out / stale, ignore_errors=True)
    seeds, car_ids, _ = _cars(seed, cars + test_cars)
    writer = _Writer(out, as_zip=False)
    renders = Parallel(n_jobs=jobs, return_as="generator")(
        delayed(render_car)(int(car_seed), width, height, parts=True) for car_seed in seeds
    )
    for index, (car_id, views) in enumerate(zip(car_ids, renders)):
        images, masks = ("test", "test_masks") if index >= cars else ("images", "masks")
        for view, (jpeg, mask) in enumerate(views, start=1):
            writer.file(images, f"{car_id}_{view:02d}.jpg", jpeg)
            writer.file(masks, f"{car_id}_{view:02d}.png", encode_part_png(mask))
    with atomic_output(out / "classes.txt") as partial:
        partial.write_text("\n".join(PARTS) + "\n")
    return out


def generate_multilabel(
    out: str | Path,
    cars: int = 8,
    test_cars: int = 4,
    width: int = 384,
    height: int = 256,
    seed: int = 0,
    shadow_share: float = SHADOW_SHARE,
    jobs: int = -1,
) -> Path:
    """Write the overlapping-labels set under ``out`` as UW-Madison ships its masks: ``train/`` and ``test/``
    images (``<car>_<NN>.jpg``), ``train.csv`` with one ``id,class,segmentation`` row per (image, label) of
    LABELS (row-major RLE, an empty cell where the label is absent), ``sample_submission.csv``
    (``id,class,predicted``, every test pair, empty) and ``test_masks.csv``, the test truth in train.csv's
    columns for scoring. The same studio cars as the other sets of ``seed``. Returns ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("train", "test"):
        shutil.rmtree(out / stale, ignore_errors=True)
    seeds, car_ids, _ = _cars(seed, cars + test_cars)
    writer = _Writer(out, as_zip=False)
    rows: dict[str, list[tuple[str, str, str]]] = {"train": [], "test": []}
    renders = Parallel(n_jobs=jobs, return_as="generator")(
        delayed(render_car)(int(car_seed), width, height, shadow_share=shadow_share) for car_seed in seeds
    )
    for index, (car_id, views) in enumerate(zip(car_ids, renders)):
        folder = "test" if index >= cars else "train"
        for view, (jpeg, labels) in enumerate(views, start=1):
            image_id = f"{car_id}_{view:02d}"
            writer.file(folder, f"{image_id}.jpg", jpeg)
            rows[folder].extend((image_id, name, rle_encode(label)) for name, label in zip(LABELS, labels))
    train, test = (sorted(rows[folder], key=lambda row: (row[0], LABELS.index(row[1]))) for folder in rows)
    columns = ["id", "class", "segmentation"]
    writer.csv("train.csv", pd.DataFrame(train, columns=columns))
    writer.csv(
        "sample_submission.csv", pd.DataFrame([(i, c, "") for i, c, _ in test], columns=["id", "class", "predicted"])
    )
    writer.csv("test_masks.csv", pd.DataFrame(test, columns=columns))
    return out


# Default (cars, test cars, width, height) of each set.
_DEFAULTS = {"carvana": (24, 8, 1918, 1280), "parts": (8, 2, 240, 160), "multilabel": (8, 4, 384, 256)}


# --slides: tiled TIFFs of "tissue" (pinkish blobs on white) with glomerulus-like discs to segment, HuBMAP's layout.
SLIDE_TILE = 256  # the TIFF's tile side, and the rendering's unit: memory stays a few tiles, whatever the slide's size
GLOMERULUS_RADII = (20, 60)  # pixels, as at HuBMAP's scale of a few hundred pixels across one
DISC_GAP = 8  # pixels at least between two discs' edges: no two runs of the column-major RLE ever touch
TISSUE_SHARE = 0.4  # of a slide's area: the tissue field's threshold is its quantile
_WHITE, _PINK, _GLOMERULUS, _CAPSULE = (243, 241, 245), (228, 150, 192), (168, 88, 170), (238, 214, 236)


@dataclass
class SlidePlan:
    """Everything a slide's pixels follow: its size, a coarse noise grid per octave for the tissue, and the discs
    (rows of centre y, centre x, radius) that are its mask."""

    height: int
    width: int
    octaves: list[tuple[int, np.ndarray]]  # (cell size in pixels, grid of values in [0, 1))
    discs: np.ndarray
    seed: int
    tissue_level: float = 0.5  # the tissue field's value at the edge of the tissue


def plan_slide(size: int, seed: int) -> SlidePlan:
    """A ``size`` x ``size`` slide: its tissue field and discs, placed on tissue, apart, away from the border."""
    rng = np.random.default_rng(seed)
    octaves = [(cell, rng.random((size // cell + 2, size // cell + 2))) for cell in (2048, 512)]
    plan = SlidePlan(size, size, octaves, np.zeros((0, 3), np.int64), seed)
    samples = np.linspace(0, size - 1, 64)
    field = tissue_field(plan, samples[:, None], samples[None, :])
    plan.tissue_level = float(np.quantile(field, 1 - TISSUE_SHARE))
    centres = float(np.quantile(field, 1 - TISSUE_SHARE / 2))  # discs well inside the tissue
    wanted = max(1, round(size * size * TISSUE_SHARE / 400**2))
    discs: list[tuple[int, int, int]] = []
    for _ in range(wanted * 20):
        if len(discs) == wanted:
            break
        radius = int(rng.integers(*GLOMERULUS_RADII, endpoint=True))
        margin = radius + DISC_GAP + 8
        cy, cx = (int(v) for v in rng.integers(margin, size - margin, 2))
        if tissue_field(plan, np.array([[cy]]), np.array([[cx]]))[0, 0] < centres:
            continue
        if all((cy - y) ** 2 + (cx - x) ** 2 > (radius + r + DISC_GAP) ** 2 for y, x, r in discs):
            discs.append((cy, cx, radius))
    plan.discs = np.array(discs, np.int64).reshape(-1, 3)
    return plan


def tissue_field(plan: SlidePlan, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Smooth value noise in [0, 1) at pixel coordinates (ys, xs): bilinear in each octave's grid, so any window
    of the slide is rendered alike, alone or as part of the whole."""
    field = np.zeros(np.broadcast_shapes(ys.shape, xs.shape))
    for (cell, grid), weight in zip(plan.octaves, (0.75, 0.25)):
        gy, gx = ys / cell, xs / cell
        y0, x0 = np.floor(gy).astype(np.int64), np.floor(gx).astype(np.int64)
        fy, fx = gy - y0, gx - x0
        top = grid[y0, x0] * (1 - fx) + grid[y0, x0 + 1] * fx
        bottom = grid[y0 + 1, x0] * (1 - fx) + grid[y0 + 1, x0 + 1] * fx
        field = field + weight * (top * (1 - fy) + bottom * fy)
    return field


def slide_mask_window(plan: SlidePlan, y: int, x: int, height: int, width: int) -> np.ndarray:
    """uint8 (height, width) window of the slide's mask: 1 inside a disc ((y - cy)² + (x - cx)² <= r²), each disc
    drawn in its own box, so a band across a whole slide costs its discs, not its width times their count."""
    mask = np.zeros((height, width), np.uint8)
    for cy, cx, radius in _discs_near(plan, y, x, height, width, 0).tolist():
        top, left = max(cy - radius, y), max(cx - radius, x)
        bottom, right = min(cy + radius + 1, y + height), min(cx + radius + 1, x + width)
        ys, xs = np.arange(top, bottom)[:, None], np.arange(left, right)[None, :]
        mask[top - y : bottom - y, left - x : right - x] |= ((ys - cy) ** 2 + (xs - cx) ** 2 <= radius * radius).astype(
            np.uint8
        )
    return mask


def _discs_near(plan: SlidePlan, y: int, x: int, height: int, width: int, reach: int) -> np.ndarray:
    cy, cx, radius = plan.discs.T
    near = (cy + radius + reach >= y) & (cy - radius - reach < y + height)
    near &= (cx + radius + reach >= x) & (cx - radius - reach < x + width)
    return plan.discs[near]


def slide_window(plan: SlidePlan, y: int, x: int, height: int, width: int) -> np.ndarray:
    """uint8 RGB (height, width, 3) window of the slide: white glass, pink tissue, each disc purple in a pale
    capsule ring; speckle from a generator seeded by the window's place, so the TIFF's tiles are the same every
    time."""
    ys, xs = np.arange(y, y + height)[:, None], np.arange(x, x + width)[None, :]
    field = tissue_field(plan, ys, xs)
    tissue = np.clip((field - plan.tissue_level) * 40, 0, 1)[..., None]  # a soft edge a few pixels wide
    image = np.asarray(_WHITE, np.float64) * (1 - tissue) + np.asarray(_PINK, np.float64) * tissue
    for cy, cx, radius in _discs_near(plan, y, x, height, width, 6):
        distance = np.sqrt((ys - cy) ** 2 + (xs - cx) ** 2)
        image[(distance > radius) & (distance <= radius + 5)] = _CAPSULE
        image[(ys - cy) ** 2 + (xs - cx) ** 2 <= radius * radius] = _GLOMERULUS
    rng = np.random.default_rng([plan.seed, y, x])
    image += rng.normal(0, 6, (height, width, 1)) * (0.3 + tissue)
    return np.clip(image, 0, 255).astype(np.uint8)


def column_major_rle(plan: SlidePlan) -> str:
    """The mask's RLE in HuBMAP's convention (pixels numbered down each column, 1-indexed ``start length``),
    from the discs' geometry: no mask is ever drawn whole."""
    starts, lengths = [], []
    for cy, cx, radius in plan.discs.tolist():
        columns = np.arange(cx - radius, cx + radius + 1)
        half = np.array([math.isqrt(radius * radius - (column - cx) ** 2) for column in columns.tolist()])
        starts.append(columns * plan.height + cy - half + 1)
        lengths.append(2 * half + 1)
    if not starts:
        return ""
    starts, lengths = np.concatenate(starts), np.concatenate(lengths)
    order = np.argsort(starts)
    return " ".join(f"{start} {length}" for start, length in zip(starts[order].tolist(), lengths[order].tolist()))


def write_slide(plan: SlidePlan, path: Path) -> None:
    """The slide as a tiled RGB TIFF (256 x 256 tiles, deflate), rendered and compressed one tile at a time."""
    import tifffile  # requirements-slides.txt: only this data set needs it

    tiles = (
        slide_window(plan, top, left, SLIDE_TILE, SLIDE_TILE)
        for top in range(0, plan.height, SLIDE_TILE)
        for left in range(0, plan.width, SLIDE_TILE)
    )
    with atomic_output(path) as partial:
        tifffile.imwrite(
            partial, tiles, shape=(plan.height, plan.width, 3), dtype=np.uint8, tile=(SLIDE_TILE, SLIDE_TILE),
            photometric="rgb", compression="zlib", compressionargs={"level": 1},
            bigtiff=plan.height * plan.width * 3 > 2**31,
        )  # fmt: skip


def generate_slides(out: str | Path, size: int = 4096, count: int = 3, test_count: int = 1, seed: int = 0) -> Path:
    """HuBMAP's layout under ``out``: ``train/<id>.tiff`` with ``train.csv`` (id, encoding: column-major RLE),
    ``test/<id>.tiff`` with ``sample_submission.csv`` (id, predicted) and ``test_masks.csv`` (the test truth, for
    scoring). Returns ``out``."""
    out = Path(out)
    for stale in ("train", "test"):
        shutil.rmtree(out / stale, ignore_errors=True)
        (out / stale).mkdir(parents=True)
    seeds = np.random.SeedSequence(seed).generate_state(count + test_count + 1)
    naming = np.random.default_rng(seeds[-1])
    rows: dict[str, list[tuple[str, str]]] = {"train": [], "test": []}
    for index, slide_seed in enumerate(seeds[:-1]):
        slide_id, folder = naming.bytes(5).hex()[:9], "train" if index < count else "test"
        plan = plan_slide(size, int(slide_seed))
        write_slide(plan, out / folder / f"{slide_id}.tiff")
        rows[folder].append((slide_id, column_major_rle(plan)))
    writer = _Writer(out, as_zip=False)
    writer.csv("train.csv", pd.DataFrame(sorted(rows["train"]), columns=["id", "encoding"]))
    writer.csv("test_masks.csv", pd.DataFrame(sorted(rows["test"]), columns=["id", "encoding"]))
    writer.csv(
        "sample_submission.csv", pd.DataFrame([(i, "") for i, _ in sorted(rows["test"])], columns=["id", "predicted"])
    )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="input", help="data folder to write (default: input/)")
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument(
        "--parts",
        action="store_true",
        help="the multi-class set instead: each pixel labelled background, body, glass, wheels or lights, in "
        "images/ + masks/ (palette PNGs) + classes.txt, test/ + test_masks/; smaller defaults: 8 + 2 cars, 240x160",
    )
    kind.add_argument(
        "--multilabel",
        action="store_true",
        help="the overlapping-labels set instead, as UW-Madison ships it: car, glass and shadow (in about 30%% of "
        "the images) as id,class,segmentation RLE rows in train.csv, train/ + test/ images, sample_submission.csv, "
        "test_masks.csv; defaults: 8 + 4 cars, 384x256",
    )
    parser.add_argument(
        "--slides",
        action="store_true",
        help="HuBMAP-like slides instead: large tiled TIFFs of tissue with round glomeruli to segment, train/ + "
        "train.csv (column-major RLE), test/ + test_masks.csv; written tile by tile, so memory stays small",
    )
    parser.add_argument("--slide-size", type=int, default=4096, help="--slides: pixels a side (default: 4096)")
    parser.add_argument("--slide-count", type=int, default=3, help="--slides: training slides (default: 3)")
    parser.add_argument("--test-slide-count", type=int, default=1, help="--slides: test slides (default: 1)")
    parser.add_argument(
        "--cars", type=int, help="training cars, 16 images each (default: 24; --parts: 8; --multilabel: 8)"
    )
    parser.add_argument(
        "--test-cars", type=int, help="test cars, 16 images each (default: 8; --parts: 2; --multilabel: 4)"
    )
    parser.add_argument("--width", type=int, help="default: 1918; --parts: 240; --multilabel: 384")
    parser.add_argument("--height", type=int, help="default: 1280; --parts: 160; --multilabel: 256")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--zip", action="store_true", help="write the competition's zip archives instead of folders")
    parser.add_argument("--jobs", type=int, default=-1, help="processes (default: all cores)")
    args = parser.parse_args(argv)
    chosen = "parts" if args.parts else "multilabel" if args.multilabel else "carvana"
    for name, value in zip(("cars", "test_cars", "width", "height"), _DEFAULTS[chosen]):
        if getattr(args, name) is None:
            setattr(args, name, value)
    if chosen != "carvana" and args.zip:
        parser.error(f"--zip is for the Carvana format; --{chosen} writes folders")
    if args.cars < 1 or args.test_cars < 0 or args.width < 64 or args.height < 64:
        parser.error("need --cars >= 1, --test-cars >= 0 and images of at least 64x64")
    if args.slides and (args.parts or args.multilabel or args.zip):
        parser.error("--slides writes its own layout (tiled TIFFs); leave out --parts, --multilabel and --zip")
    if args.slides and (args.slide_size < 1024 or args.slide_count < 1 or args.test_slide_count < 0):
        parser.error("--slides needs --slide-size >= 1024, --slide-count >= 1 and --test-slide-count >= 0")
    with exit_on_project_error(parser.prog):
        check_writable(args.out, "--out", folder=True)
        if args.slides:
            out = generate_slides(args.out, args.slide_size, args.slide_count, args.test_slide_count, args.seed)
            print(
                f"wrote {args.slide_count} training and {args.test_slide_count} test slides "
                f"({args.slide_size}x{args.slide_size}, tiled TIFF) to {out}/"
            )
            return
    counts = f"{args.cars * VIEWS} training and {args.test_cars * VIEWS} test images ({args.width}x{args.height})"
    size = (args.cars, args.test_cars, args.width, args.height, args.seed)
    if args.parts:
        out = generate_parts(args.out, *size, jobs=args.jobs)
        print(f"wrote {counts} labelled by part ({', '.join(PARTS)}) to {out}/")
    elif args.multilabel:
        out = generate_multilabel(args.out, *size, jobs=args.jobs)
        print(f"wrote {counts} labelled {', '.join(LABELS)} (overlapping) as per-class RLE rows in {out}/train.csv")
    else:
        out = generate(args.out, *size, as_zip=args.zip, jobs=args.jobs)
        print(f"wrote {counts} to {out}/; one car's views: {out}/contact_sheet.png")


if __name__ == "__main__":
    main()

"""The Shapes world: procedural objects with exact geometry, colors and captions.

Every object is a `Shape` (geometry as a signed distance function, negative inside) painted in one
of the `COLORS`. Objects follow gen3d's convention (`gen3d.cameras`): world +z up, the front faces
+x (seen by the camera at azimuth 0), everything inside the ball of radius `BOUND_RADIUS` = 0.75.

Signed distances. Primitives (sphere, box, capped cylinder, torus, capsule, revolved or extruded
convex polygons) are exact. Composites use ``min`` (union), ``max`` (intersection) and
``max(a, -b)`` (subtraction); these keep the function 1-Lipschitz, so sphere tracing stays safe,
but they are exact only outside unions (inside, and near the edges of intersections, the value is a
lower bound on the true distance). Exact everywhere outside (unions of exact parts): sphere, cube,
cylinder, cone, torus, capsule, house, chair, table, lamp, snowman, rocket, tree. Lower bounds
near their intersections: pyramid (two crossed prisms), mug (hollowed, clipped handle), mushroom
(clipped cap). All are 1-Lipschitz (tested), so every one is safe to sphere trace.

Parts and colors. A shape is a main part, painted in the object's color, and optional detail parts
with fixed colors (a door, a nose, eyes). A surface point belongs to the part with the smallest
signed distance there (`Shape.part`); details protrude a little from the main part so that rule is
unambiguous. A detail may coincide with an object color (an orange snowman's carrot nose): accepted,
the main body still carries the color.

Fronts (`has_front`). mug: handle on +y, so the front view shows the body with the handle in profile
on the right and the back view shows it on the left (mirror images: for a mug only the handle's side
tells front from back); house: gable end with a door and two windows on
+x, blank back wall; chair: open front, backrest on -x; snowman: carrot nose, eyes and buttons on
+x; rocket: porthole on +x. The other shapes have no canonical heading about z (continuous or
four-fold symmetry): `rotational_symmetry` is True and 3D metrics take the best score over azimuth.

Captions. `caption` fills a template with a color synonym and a shape synonym ("a crimson cup, 3d
render"); `vocabulary` lists every word a caption can contain; `parse_prompt` maps any caption or
synonym phrase back to its `WorldObject`. `HELD_OUT` (color, shape) pairs never appear in
`training_objects()`: a prior trained on the rest that still draws them shows composition.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

BOUND_RADIUS = 0.75
"""Every shape lies strictly inside the ball of this radius around the origin (tested)."""

SDF = Callable[[Tensor], Tensor]  # points [P, 3] -> signed distance [P]
RGB = tuple[float, float, float]  # sRGB in [0, 1]


# ----------------------------------------------------------------------------------------------
# Signed distance primitives (points [P, 3] -> [P]); 2D helpers take q [P, 2].


def _v(p: Tensor, xyz) -> Tensor:
    return p.new_tensor(xyz)


def sd_sphere(p: Tensor, center, radius: float) -> Tensor:
    return (p - _v(p, center)).norm(dim=-1) - radius


def sd_box(p: Tensor, center, half, rounding: float = 0.0) -> Tensor:
    """Axis-aligned box of half extents `half`, edges rounded by `rounding` (exact)."""
    q = (p - _v(p, center)).abs() - (_v(p, half) - rounding)  # [P, 3]
    return q.clamp_min(0).norm(dim=-1) + q.amax(dim=-1).clamp_max(0) - rounding


def _sd_rect2d(d: Tensor) -> Tensor:
    """Exact 2D distance from per-axis signed offsets d [P, 2] (d = |q| - half extents)."""
    return d.clamp_min(0).norm(dim=-1) + d.amax(dim=-1).clamp_max(0)


def sd_cylinder(p: Tensor, center, radius: float, half_height: float) -> Tensor:
    """Capped cylinder along z (exact)."""
    q = p - _v(p, center)
    rho = q[:, :2].norm(dim=-1)
    return _sd_rect2d(torch.stack([rho - radius, q[:, 2].abs() - half_height], -1))


def sd_torus(p: Tensor, center, major: float, minor: float, axis: int = 2) -> Tensor:
    """Torus around the `axis` through `center` (exact)."""
    q = p - _v(p, center)
    other = [i for i in range(3) if i != axis]
    rho = q[:, other].norm(dim=-1)
    return torch.stack([rho - major, q[:, axis]], -1).norm(dim=-1) - minor


def sd_capsule(p: Tensor, a, b, radius: float) -> Tensor:
    """Segment a-b thickened by `radius` (exact)."""
    a, b = _v(p, a), _v(p, b)
    ab, ap = b - a, p - a
    h = ((ap @ ab) / (ab @ ab)).clamp(0, 1)  # [P]
    return (ap - h[:, None] * ab).norm(dim=-1) - radius


def _sd_polygon2d(q: Tensor, verts) -> Tensor:
    """Exact signed distance from q [P, 2] to a convex polygon with counter-clockwise `verts` [(x, y), ...]."""
    x, y = q[:, 0], q[:, 1]
    d2 = inside = None
    for (ax, ay), (bx, by) in zip(verts, [*verts[1:], verts[0]]):
        ex, ey = bx - ax, by - ay
        wx, wy = x - ax, y - ay
        h = ((wx * ex + wy * ey) / max(ex * ex + ey * ey, 1e-12)).clamp(0, 1)  # [P] nearest point on the edge
        e2 = (wx - h * ex).square() + (wy - h * ey).square()
        left = ex * wy - ey * wx >= 0  # inside of a counter-clockwise edge
        d2 = e2 if d2 is None else torch.minimum(d2, e2)
        inside = left if inside is None else inside & left
    d = d2.sqrt()
    return torch.where(inside, -d, d)


def sd_revolved(p: Tensor, profile, center=(0.0, 0.0, 0.0), axis: int = 2) -> Tensor:
    """Solid of revolution about `axis` of a convex polygon given in (radius, height) coordinates.

    Exact when the polygon is mirror-symmetric about radius 0 (then it contains the axis); pass only
    its right half, as ``[(r0, h0), (r1, h1), ...]`` from the bottom of the axis counter-clockwise.
    """
    q = p - _v(p, center)
    other = [i for i in range(3) if i != axis]
    rho = q[:, other].norm(dim=-1)
    right = list(profile)
    left = [(-r, h) for r, h in reversed(right)]
    return _sd_polygon2d(torch.stack([rho, q[:, axis]], -1), right + left)


def sd_cone(p: Tensor, center, r_bottom: float, r_top: float, half_height: float, axis: int = 2) -> Tensor:
    """Capped cone (frustum) along `axis`: radius `r_bottom` at -half_height, `r_top` at +half_height (exact).

    In the (radius, height) half-plane the boundary is the two caps and the slanted side; the axis is
    not boundary, so the distance is the nearest of those three segments.
    """
    q = p - _v(p, center)
    other = [i for i in range(3) if i != axis]
    rho, y = q[:, other].norm(dim=-1), q[:, axis]  # [P]
    h = half_height
    bottom = (rho - r_bottom).clamp_min(0).square() + (y + h).square()
    top = (rho - r_top).clamp_min(0).square() + (y - h).square()
    ex, ey = r_top - r_bottom, 2 * h  # side segment from (r_bottom, -h) to (r_top, h)
    wx, wy = rho - r_bottom, y + h
    t = ((wx * ex + wy * ey) / (ex * ex + ey * ey)).clamp(0, 1)
    side = (wx - t * ex).square() + (wy - t * ey).square()
    d = torch.minimum(torch.minimum(bottom, top), side).sqrt()
    inside = (y.abs() <= h) & (ex * wy - ey * wx >= 0)  # between the caps and left of the upward side
    return torch.where(inside, -d, d)


def sd_prism(p: Tensor, triangle, half_length: float, axis: int = 0) -> Tensor:
    """A convex polygon in the plane of the two other axes extruded ±`half_length` along `axis` (exact)."""
    other = [i for i in range(3) if i != axis]
    d2 = _sd_polygon2d(p[:, other], triangle)
    return _sd_rect2d(torch.stack([d2, p[:, axis].abs() - half_length], -1))


def union(*ds: Tensor) -> Tensor:
    return torch.stack(ds, 0).amin(dim=0)


def intersection(*ds: Tensor) -> Tensor:
    return torch.stack(ds, 0).amax(dim=0)


# ----------------------------------------------------------------------------------------------
# Shapes


@dataclass(frozen=True)
class Shape:
    """One object geometry with its parts and words."""

    name: str
    """Canonical name, used in `WorldObject.shape`."""
    synonyms: tuple[str, ...]
    """Lowercase words or phrases that name the shape in captions; the first is the canonical name."""
    main: SDF = field(repr=False)
    """Signed distance of the main part (painted in the object's color)."""
    details: tuple[SDF, ...] = field(default=(), repr=False)
    """Signed distances of the detail parts 1..K."""
    detail_colors: tuple[RGB, ...] = ()
    """Fixed sRGB color of each detail part."""
    rotational_symmetry: bool = False
    """No canonical heading about z (continuous or 4-fold symmetry): metrics take the best over azimuth."""
    has_front: bool = False
    """The +x side is a recognisable front that differs from the back."""
    inside_point: tuple[float, float, float] = (0.0, 0.0, 0.0)
    """A point known to be inside the main part (for tests)."""

    def sdf(self, points: Tensor) -> Tensor:
        """Signed distance [P] (negative inside) at points [P, 3]."""
        _check_points(points)
        return union(self.main(points), *(d(points) for d in self.details)) if self.details else self.main(points)

    def part(self, points: Tensor) -> Tensor:
        """Which part each point [P, 3] belongs to (the nearest one): long [P], 0 = main, k = detail k."""
        _check_points(points)
        if not self.details:
            return torch.zeros(points.shape[0], dtype=torch.long, device=points.device)
        return torch.stack([self.main(points), *(d(points) for d in self.details)], 0).argmin(dim=0)


def _check_points(points: Tensor) -> None:
    if points.ndim != 2 or points.shape[-1] != 3:
        raise ValueError(f"points must be [P, 3], got {tuple(points.shape)}")
    if not points.is_floating_point():
        raise ValueError(f"points must be a floating point tensor, got {points.dtype}")


DARK = (0.09, 0.09, 0.10)  # eyes, buttons, door handles: near black but not the black background


def _mug(p: Tensor) -> Tensor:
    body = intersection(sd_cylinder(p, (0, 0, -0.025), 0.3, 0.325), -sd_cylinder(p, (0, 0, 0.21), 0.25, 0.3))
    handle = intersection(sd_torus(p, (0, 0.3, -0.03), 0.15, 0.042, axis=0), 0.28 - p[:, 1])
    return union(body, handle)


def _house(p: Tensor) -> Tensor:
    walls = sd_box(p, (0, 0, -0.25), (0.3, 0.3, 0.22))
    roof = sd_prism(p, [(-0.38, -0.03), (0.38, -0.03), (0.0, 0.38)], 0.36, axis=0)
    chimney = sd_box(p, (-0.12, 0.18, 0.22), (0.05, 0.05, 0.12))
    return union(walls, roof, chimney)


def _house_door(p: Tensor) -> Tensor:
    return sd_box(p, (0.3, 0, -0.345), (0.018, 0.075, 0.125))


def _house_windows(p: Tensor) -> Tensor:
    sides = [sd_box(p, (x, y, -0.2), (0.07, 0.012, 0.06)) for x in (-0.13, 0.13) for y in (-0.3, 0.3)]
    fronts = [sd_box(p, (0.3, y, -0.24), (0.012, 0.055, 0.055)) for y in (-0.19, 0.19)]
    return union(*sides, *fronts)


def _chair(p: Tensor) -> Tensor:
    seat = sd_box(p, (0, 0, -0.05), (0.25, 0.25, 0.035))
    back = sd_box(p, (-0.22, 0, 0.23), (0.03, 0.25, 0.25))
    legs = [sd_box(p, (x, y, -0.28), (0.03, 0.03, 0.21)) for x in (-0.22, 0.22) for y in (-0.22, 0.22)]
    return union(seat, back, *legs)


def _table(p: Tensor) -> Tensor:
    top = sd_box(p, (0, 0, 0.1), (0.42, 0.42, 0.035))
    legs = [sd_box(p, (x, y, -0.19), (0.035, 0.035, 0.27)) for x in (-0.35, 0.35) for y in (-0.35, 0.35)]
    return union(top, *legs)


def _snowman(p: Tensor) -> Tensor:
    return union(sd_sphere(p, (0, 0, -0.27), 0.3), sd_sphere(p, (0, 0, 0.1), 0.22), sd_sphere(p, (0, 0, 0.4), 0.16))


def _snowman_nose(p: Tensor) -> Tensor:  # a carrot along +x out of the head
    return sd_cone(p, (0.24, 0, 0.39), 0.055, 0.0, 0.12, axis=0)


def _snowman_dots(p: Tensor) -> Tensor:  # eyes and buttons
    eyes = [sd_sphere(p, (0.132, y, 0.46), 0.032) for y in (-0.065, 0.065)]
    buttons = [sd_sphere(p, (0.22 * math.cos(a), 0, 0.1 + 0.22 * math.sin(a)), 0.026) for a in (0.35, -0.05, -0.45)]
    return union(*eyes, *buttons)


def _lamp_shade(p: Tensor) -> Tensor:
    return sd_cone(p, (0, 0, 0.22), 0.36, 0.2, 0.2)


def _lamp_stand(p: Tensor) -> Tensor:
    return union(sd_cylinder(p, (0, 0, -0.45), 0.24, 0.035), sd_cylinder(p, (0, 0, -0.2), 0.028, 0.25))


def _mushroom_cap(p: Tensor) -> Tensor:
    return intersection(sd_sphere(p, (0, 0, -0.12), 0.5), 0.02 - p[:, 2])


def _mushroom_stem(p: Tensor) -> Tensor:
    return sd_cone(p, (0, 0, -0.22), 0.17, 0.13, 0.25)


def _rocket(p: Tensor) -> Tensor:
    body = sd_cylinder(p, (0, 0, -0.1), 0.17, 0.28)
    nose = sd_cone(p, (0, 0, 0.34), 0.17, 0.0, 0.16)
    # four fins on the diagonals, so the front view shows two of them symmetrically
    u, v = (p[:, 0] + p[:, 1]) / math.sqrt(2), (p[:, 0] - p[:, 1]) / math.sqrt(2)
    fin_profile = [(0.12, -0.48), (0.36, -0.48), (0.36, -0.38), (0.14, -0.1)]
    fins = [sd_prism(torch.stack([a.abs(), b, p[:, 2]], -1), fin_profile, 0.018, axis=1) for a, b in ((u, v), (v, u))]
    return union(body, nose, *fins)


def _rocket_porthole(p: Tensor) -> Tensor:
    return sd_cylinder(p[:, [1, 2, 0]], (0, 0.06, 0.16), 0.09, 0.02)  # a disk facing +x


def _tree(p: Tensor) -> Tensor:
    return union(sd_cone(p, (0, 0, -0.14), 0.4, 0.06, 0.18), sd_cone(p, (0, 0, 0.1), 0.32, 0.04, 0.17),
                 sd_cone(p, (0, 0, 0.35), 0.24, 0.0, 0.19))


def _pyramid(p: Tensor) -> Tensor:
    # a square pyramid is the intersection of two triangular prisms, one along x and one along y
    triangle = [(-0.38, -0.4), (0.38, -0.4), (0.0, 0.45)]
    return intersection(sd_prism(p, triangle, 0.38, axis=0), sd_prism(p[:, [1, 0, 2]], triangle, 0.38, axis=0))


SHAPES: dict[str, Shape] = {s.name: s for s in [
    Shape("sphere", ("sphere", "ball", "orb"), lambda p: sd_sphere(p, (0, 0, 0), 0.5), rotational_symmetry=True),
    Shape("cube", ("cube", "box", "block"), lambda p: sd_box(p, (0, 0, 0), (0.34, 0.34, 0.34), 0.025),
          rotational_symmetry=True),
    Shape("cylinder", ("cylinder", "pillar"), lambda p: sd_cylinder(p, (0, 0, 0), 0.36, 0.42),
          rotational_symmetry=True),
    Shape("cone", ("cone",), lambda p: sd_cone(p, (0, 0, 0.02), 0.42, 0.0, 0.46), rotational_symmetry=True,
          inside_point=(0, 0, -0.2)),
    Shape("torus", ("torus", "donut", "ring"), lambda p: sd_torus(p, (0, 0, 0), 0.36, 0.16),
          rotational_symmetry=True, inside_point=(0.36, 0, 0)),
    Shape("capsule", ("capsule", "pill"), lambda p: sd_capsule(p, (0, 0, -0.27), (0, 0, 0.27), 0.24),
          rotational_symmetry=True),
    Shape("pyramid", ("pyramid",), _pyramid, rotational_symmetry=True, inside_point=(0, 0, -0.2)),
    Shape("mug", ("mug", "cup"), _mug, has_front=True, inside_point=(0.27, 0, -0.1)),
    Shape("house", ("house", "hut", "cottage"), _house, (_house_door, _house_windows),
          ((0.2, 0.11, 0.05), (0.62, 0.8, 0.95)), has_front=True),
    Shape("chair", ("chair",), _chair, has_front=True, inside_point=(0, 0, -0.05)),
    Shape("table", ("table", "desk"), _table, rotational_symmetry=True, inside_point=(0, 0, 0.1)),
    Shape("lamp", ("lamp",), _lamp_shade, (_lamp_stand,), ((0.32, 0.32, 0.34),), rotational_symmetry=True,
          inside_point=(0, 0, 0.2)),
    Shape("snowman", ("snowman",), _snowman, (_snowman_nose, _snowman_dots), ((1.0, 0.45, 0.05), DARK),
          has_front=True),
    Shape("mushroom", ("mushroom", "toadstool"), _mushroom_cap, (_mushroom_stem,), ((0.93, 0.88, 0.74),),
          rotational_symmetry=True, inside_point=(0, 0, 0.2)),
    Shape("rocket", ("rocket", "spaceship"), _rocket, (_rocket_porthole,), ((0.7, 0.86, 0.97),),
          has_front=True),
    Shape("tree", ("tree", "pine"), _tree, (lambda p: sd_cylinder(p, (0, 0, -0.4), 0.07, 0.12),),
          ((0.42, 0.26, 0.12),), rotational_symmetry=True, inside_point=(0, 0, 0)),
]}


# ----------------------------------------------------------------------------------------------
# Colors, objects, captions

COLORS: dict[str, tuple[RGB, list[str]]] = {
    # sRGB albedo and the words that name it; none is near the white or black render backgrounds.
    "red": ((0.84, 0.12, 0.1), ["red", "crimson", "scarlet"]),
    "orange": ((0.98, 0.52, 0.08), ["orange", "tangerine"]),
    "yellow": ((0.96, 0.84, 0.14), ["yellow", "golden"]),
    "green": ((0.18, 0.64, 0.2), ["green", "emerald"]),
    "teal": ((0.08, 0.6, 0.62), ["teal", "turquoise", "cyan"]),
    "blue": ((0.14, 0.3, 0.86), ["blue", "cobalt"]),
    "purple": ((0.52, 0.2, 0.72), ["purple", "violet"]),
    "pink": ((0.96, 0.5, 0.72), ["pink", "rosy"]),
    "brown": ((0.52, 0.31, 0.13), ["brown", "chocolate"]),
    "gray": ((0.56, 0.56, 0.56), ["gray", "grey", "silver"]),
}

HELD_OUT: list[tuple[str, str]] = [
    # (color, shape) pairs left out of prior training: each color and each shape is still seen with
    # others, so generating these measures composition rather than memorisation.
    ("blue", "mug"),
    ("green", "house"),
    ("red", "chair"),
    ("yellow", "torus"),
    ("purple", "snowman"),
]

TEMPLATES = (
    "{a} {color} {shape}",
    "{a} {color} {shape}, 3d render",
    "a 3d render of {a} {color} {shape}",
    "{color} {shape}",
    "{a} small {color} {shape}",
)
"""Caption templates; ``{a}`` becomes "a" or "an" by the next word."""


@dataclass(frozen=True)
class WorldObject:
    """A shape painted in a color, e.g. ``WorldObject("mug", "red")``."""

    shape: str
    color: str

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; known: {sorted(SHAPES)}")
        if self.color not in COLORS:
            raise ValueError(f"unknown color {self.color!r}; known: {sorted(COLORS)}")

    @property
    def shape_def(self) -> Shape:
        return SHAPES[self.shape]

    @property
    def rgb(self) -> RGB:
        return COLORS[self.color][0]

    def sdf(self, points: Tensor) -> Tensor:
        """Signed distance [P] at points [P, 3], negative inside."""
        return self.shape_def.sdf(points)

    def occupancy(self, points: Tensor) -> Tensor:
        """bool [P]: the point is inside (sdf <= 0)."""
        return self.sdf(points) <= 0

    def color_at(self, points: Tensor) -> Tensor:
        """Albedo [P, 3] (sRGB) of the part each point [P, 3] belongs to."""
        palette = points.new_tensor([self.rgb, *self.shape_def.detail_colors])  # [1 + K, 3]
        return palette[self.shape_def.part(points)]

    def caption(self, rng=None) -> str:
        return caption(self.shape, self.color, rng)

    def __str__(self) -> str:
        return f"{self.color} {self.shape}"


def all_objects() -> list[WorldObject]:
    """Every (shape, color) combination, shapes in catalog order, colors in `COLORS` order."""
    return [WorldObject(s, c) for s in SHAPES for c in COLORS]


def training_objects() -> list[WorldObject]:
    """`all_objects()` without the `HELD_OUT` pairs."""
    held = set(HELD_OUT)
    return [o for o in all_objects() if (o.color, o.shape) not in held]


def held_out_objects() -> list[WorldObject]:
    return [WorldObject(shape, color) for color, shape in HELD_OUT]


def _choice(n: int, rng) -> int:
    """Index in [0, n) from a torch.Generator, random.Random, numpy Generator/RandomState or None (-> 0)."""
    if rng is None:
        return 0
    if isinstance(rng, torch.Generator):
        return int(torch.randint(n, (1,), generator=rng))
    if isinstance(rng, random.Random):
        return rng.randrange(n)
    if hasattr(rng, "integers"):  # numpy.random.Generator
        return int(rng.integers(n))
    if hasattr(rng, "randint"):  # numpy.random.RandomState
        return int(rng.randint(n))
    raise TypeError(f"rng must be a torch.Generator, random.Random, numpy Generator or None, got {type(rng)}")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _fill(template: str, color_word: str, shape_word: str) -> str:
    text = template.replace("{color}", color_word).replace("{shape}", shape_word)
    # "{a}" agrees with the word after it
    return re.sub(r"\{a\} (\w)", lambda m: f"{_article(m.group(1))} {m.group(1)}", text)


def caption(shape: str, color: str, rng=None) -> str:
    """A caption for the object: random template and synonyms from `rng`; the plain "a red mug" if None."""
    obj = WorldObject(shape, color)
    colors, shapes = COLORS[obj.color][1], SHAPES[obj.shape].synonyms
    template = TEMPLATES[_choice(len(TEMPLATES), rng)]
    return _fill(template, colors[_choice(len(colors), rng)], shapes[_choice(len(shapes), rng)])


def all_captions(shape: str, color: str) -> list[str]:
    """Every caption `caption` can produce for the object."""
    return [_fill(t, c, s) for t in TEMPLATES for c in COLORS[color][1] for s in SHAPES[shape].synonyms]


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def vocabulary() -> list[str]:
    """Sorted list of every word a caption can contain (punctuation such as "," is not a word)."""
    words = set()
    for t in TEMPLATES:
        words.update(_words(t.replace("{a}", "a an").replace("{color}", "").replace("{shape}", "")))
    for _, names in COLORS.values():
        words.update(w for n in names for w in _words(n))
    for s in SHAPES.values():
        words.update(w for n in s.synonyms for w in _words(n))
    return sorted(words)


def _phrases() -> tuple[dict[tuple[str, ...], str], dict[tuple[str, ...], str]]:
    colors = {tuple(_words(n)): c for c, (_, names) in COLORS.items() for n in names}
    shapes = {tuple(_words(n)): s.name for s in SHAPES.values() for n in s.synonyms}
    return colors, shapes


def _find(words: list[str], table: dict[tuple[str, ...], str]) -> str | None:
    """The first phrase of `table` in `words`, preferring longer phrases at each position."""
    longest = max(len(k) for k in table)
    for i in range(len(words)):
        for n in range(min(longest, len(words) - i), 0, -1):
            hit = table.get(tuple(words[i:i + n]))
            if hit is not None:
                return hit
    return None


def parse_prompt(prompt: str) -> WorldObject | None:
    """The object a prompt names, e.g. "a crimson cup, front view" -> WorldObject("mug", "red").

    Needs one color word and one shape word (any synonym, any order, any surrounding words);
    returns None when either is missing. With several, the first of each wins.
    """
    words = _words(prompt)
    colors, shapes = _phrases()
    color, shape = _find(words, colors), _find(words, shapes)
    return WorldObject(shape, color) if color and shape else None

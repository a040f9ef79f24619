"""Captioned renders of Shapes-world objects: the training set of the embedded diffusion priors.

`build_renders` draws, for each object, `views_per_object` cameras from the same distribution as the
text-to-3D training cameras (`gen3d.cameras.OrbitConfig` defaults: azimuth stratified over the
circle, elevation, distance and field of view uniform in their ranges), renders them antialiased
(2 x 2 supersampling) and captions each view. A fraction `view_dependent_fraction` of the captions
carries the view suffix that `gen3d.priors.prompts.PromptProcessor` appends at distillation time
(", front view", ", side view", ", back view", ", overhead view", with the direction from
`view_directions` under its default thresholds), so the prior learns both the plain and the
view-dependent prompts. Symmetric shapes get view words too: their views are alike, and the prior
must still accept every prompt SDS will give it.

Everything is deterministic from `seed` (a private `torch.Generator`; the global RNG is untouched).
`build_renders(..., cache=path)` stores the set as `.npz` and reloads it when the arguments match.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from gen3d.cameras import spherical_cameras
from gen3d.priors.prompts import view_directions
from gen3d.world.catalog import WorldObject
from gen3d.world.render import render_object

BACKGROUNDS = {"white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0)}


def view_caption(caption: str, direction: str) -> str:
    """The view-dependent prompt, in `PromptProcessor`'s format: "a red mug, front view"."""
    return f"{caption}, {direction} view"


@dataclass
class RenderSet:
    """M captioned renders (M = objects x views per object)."""

    images: Tensor  # [M, H, W, 3] float in [0, 1], composited over `backgrounds`
    alphas: Tensor  # [M, H, W, 1] float coverage in [0, 1]
    captions: list[str]  # M captions, with the view suffix where view-dependent
    objects: list[WorldObject]  # M objects
    azimuth: Tensor  # [M] degrees
    elevation: Tensor  # [M] degrees
    distance: Tensor  # [M]
    fovy: Tensor  # [M] degrees
    directions: list[str]  # M view directions ("front", "side", "back", "overhead"), whether captioned or not
    backgrounds: Tensor  # [M, 3] background color of each image

    def __len__(self) -> int:
        return self.images.shape[0]

    def save(self, path: str | Path, key: str = "") -> None:
        """Write the set to an `.npz` file (images and alphas as float16, written atomically)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez_compressed(
            tmp, images=self.images.half().numpy(), alphas=self.alphas.half().numpy(),
            captions=np.array(self.captions), shapes=np.array([o.shape for o in self.objects]),
            colors=np.array([o.color for o in self.objects]), azimuth=self.azimuth.numpy(),
            elevation=self.elevation.numpy(), distance=self.distance.numpy(), fovy=self.fovy.numpy(),
            directions=np.array(self.directions), backgrounds=self.backgrounds.numpy(), key=np.array(key),
        )
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> RenderSet:
        with np.load(path) as z:
            return cls(
                images=torch.from_numpy(z["images"]).float(), alphas=torch.from_numpy(z["alphas"]).float(),
                captions=[str(c) for c in z["captions"]],
                objects=[WorldObject(str(s), str(c)) for s, c in zip(z["shapes"], z["colors"])],
                azimuth=torch.from_numpy(z["azimuth"]), elevation=torch.from_numpy(z["elevation"]),
                distance=torch.from_numpy(z["distance"]), fovy=torch.from_numpy(z["fovy"]),
                directions=[str(d) for d in z["directions"]], backgrounds=torch.from_numpy(z["backgrounds"]),
            )


def _uniform(lo: float, hi: float, n: int, g: torch.Generator) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def build_renders(
    objects: Sequence[WorldObject],
    views_per_object: int,
    size: int,
    seed: int = 0,
    elevation_range: tuple[float, float] = (-10.0, 45.0),
    distance_range: tuple[float, float] = (2.5, 3.0),
    fovy_range: tuple[float, float] = (40.0, 50.0),
    background: Literal["white", "black", "random"] = "white",
    view_dependent_fraction: float = 0.8,
    supersample: int = 2,
    cache: str | Path | None = None,
) -> RenderSet:
    """Render and caption `views_per_object` random views of each object at `size` x `size`.

    background: "white", "black", or "random" (each image white or black with equal odds).
    cache: an `.npz` path; reused when it was built with the same arguments, written otherwise.
    """
    if views_per_object < 1 or size < 1:
        raise ValueError(f"views_per_object and size must be >= 1, got {views_per_object} and {size}")
    if background not in ("white", "black", "random"):
        raise ValueError(f'background must be "white", "black" or "random", got {background!r}')
    if not 0.0 <= view_dependent_fraction <= 1.0:
        raise ValueError(f"view_dependent_fraction must be in [0, 1], got {view_dependent_fraction}")
    objects = list(objects)
    key = hashlib.sha1(json.dumps([
        [str(o) for o in objects], views_per_object, size, seed, elevation_range, distance_range, fovy_range,
        background, view_dependent_fraction, supersample,
    ]).encode()).hexdigest()
    if cache is not None and Path(cache).exists():
        with np.load(cache) as z:
            stored = str(z["key"]) if "key" in z else ""
        if stored == key:
            return RenderSet.load(cache)

    g = torch.Generator().manual_seed(seed)
    V, parts = views_per_object, []
    for obj in objects:
        azimuth = -180.0 + 360.0 * (torch.arange(V) + torch.rand(V, generator=g)) / V  # stratified
        elevation = _uniform(*elevation_range, V, g)
        distance = _uniform(*distance_range, V, g)
        fovy = _uniform(*fovy_range, V, g)
        if background == "random":
            bg = (torch.rand(V, generator=g) < 0.5).float()[:, None].expand(V, 3).contiguous()
        else:
            bg = torch.tensor(BACKGROUNDS[background]).expand(V, 3).contiguous()
        view_dependent = (torch.rand(V, generator=g) < view_dependent_fraction).tolist()
        directions = view_directions(azimuth, elevation)
        captions = [obj.caption(g) for _ in range(V)]
        captions = [view_caption(c, d) if vd else c for c, d, vd in zip(captions, directions, view_dependent)]
        cams = spherical_cameras(azimuth, elevation, distance, fovy, size, size)
        out = render_object(obj, cams, background=bg, supersample=supersample)
        parts.append((out.rgb, out.alpha, captions, [obj] * V, azimuth, elevation, distance, fovy, directions, bg))

    cat = lambda i: torch.cat([p[i] for p in parts])
    flat = lambda i: [x for p in parts for x in p[i]]
    renders = RenderSet(images=cat(0), alphas=cat(1), captions=flat(2), objects=flat(3), azimuth=cat(4),
                        elevation=cat(5), distance=cat(6), fovy=cat(7), directions=flat(8), backgrounds=cat(9))
    if cache is not None:
        renders.save(cache, key=key)
    return renders


def iterate_batches(renders: RenderSet, batch_size: int, seed: int = 0, epochs: int | None = None,
                    drop_last: bool = True) -> Iterator[tuple[Tensor, list[str]]]:
    """Shuffled (images [B, H, W, 3], captions [B]) batches; `epochs=None` repeats forever.

    Deterministic from `seed`. Images are in [0, 1]; scale to [-1, 1] for a diffusion model yourself.
    No flips: a mirrored mug would move its handle to the other side of the front.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    M = len(renders)
    if drop_last and M < batch_size:
        raise ValueError(f"batch_size {batch_size} is larger than the set ({M} images) with drop_last=True")
    g = torch.Generator().manual_seed(seed)
    epoch = 0
    while epochs is None or epoch < epochs:
        order = torch.randperm(M, generator=g)
        stop = M - M % batch_size if drop_last else M
        for start in range(0, stop, batch_size):
            idx = order[start:start + batch_size]
            yield renders.images[idx], [renders.captions[i] for i in idx.tolist()]
        epoch += 1

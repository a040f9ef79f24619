"""View-dependent prompting: the text condition each rendered view is scored against.

A text-to-image prior asked for "a dog" from every side draws a dog's face on every side (the Janus
problem). DreamFusion (Poole et al. 2022, "DreamFusion: Text-to-3D using 2D Diffusion") appends the
camera's view direction to the prompt: ``"a dog, front view"``, ``", side view"``, ``", back view"``,
``", overhead view"``. The direction of a camera follows threestudio's rule (ALGORITHMS.md §1): with
``a = ((azimuth + 180) mod 360) - 180``, a view is "side" unless ``|a| < front_threshold`` ("front"),
``|a| > 180 - back_threshold`` ("back"), or ``elevation > overhead_threshold`` ("overhead"), tested
in that order so later tests win. The unconditional embedding of every view is the negative prompt.

Perp-Neg (Armandpour et al. 2023, "Re-imagine the Negative Prompt Algorithm: Transform 2D Diffusion
into 3D, alleviate Janus problem and Beyond"), with ``use_perp_neg``: the positive embedding is an
interpolation between neighbouring view prompts by azimuth, and the other views' prompts become
negative prompts whose weights decay with the interpolation factor; the guidance then removes only
the components of those negative directions perpendicular to the positive one (see
`DiffusionPrior.predict_noise_perp_neg`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor

from gen3d.cameras import wrap_azimuth
from gen3d.errors import ConfigError

if TYPE_CHECKING:
    from gen3d.priors.diffusion import DiffusionPrior

DIRECTIONS = ("front", "side", "back", "overhead")

# Perp-Neg negative-weight curves f(r) = a * exp(-b * r) + c, as (a, b, c) (threestudio's defaults).
PERP_NEG_F_FS = (4.0, 0.5, -2.426)  # front prompt as a negative while interpolating front -> side
PERP_NEG_F_SF = (4.0, 0.5, -2.426)  # side prompt as a negative while interpolating front -> side
PERP_NEG_F_SB = (1.0, 0.5, -0.606)  # side prompt as a negative while interpolating side -> back
PERP_NEG_F_FSB = (1.0, 0.5, 0.967)  # front prompt as a negative while interpolating side -> back


class _HasViewAngles(Protocol):
    azimuth: Tensor  # [B] degrees
    elevation: Tensor  # [B] degrees


def view_directions(
    azimuth: Tensor,
    elevation: Tensor,
    front_threshold: float = 45.0,
    back_threshold: float = 45.0,
    overhead_threshold: float = 60.0,
) -> list[str]:
    """The view direction ("front", "side", "back" or "overhead") of each camera.

    azimuth, elevation: ``[B]`` degrees (gen3d's convention: azimuth 0 looks at the object's front).
    Precedence (threestudio): side by default, then front if ``|a| < front_threshold``, then back if
    ``|a| > 180 - back_threshold``, then overhead if ``elevation > overhead_threshold``.
    """
    if azimuth.shape != elevation.shape or azimuth.ndim != 1:
        raise ValueError(
            f"view_directions: azimuth and elevation must both be [B], "
            f"got {tuple(azimuth.shape)} and {tuple(elevation.shape)}"
        )
    a = wrap_azimuth(azimuth).abs().tolist()
    e = elevation.float().tolist()
    out = []
    for a_i, e_i in zip(a, e):
        d = "side"
        if a_i < front_threshold:
            d = "front"
        if a_i > 180.0 - back_threshold:
            d = "back"
        if e_i > overhead_threshold:
            d = "overhead"
        out.append(d)
    return out


@dataclass
class PromptConfig:
    """The text prompt and how it is specialised per view."""

    prompt: str = ""
    """What to generate, e.g. "a red mug"."""
    negative_prompt: str = ""
    """What to steer away from; its embedding is the unconditional branch of classifier-free guidance."""
    view_dependent: bool = True
    """Append ", front view" / ", side view" / ", back view" / ", overhead view" by camera (DreamFusion)."""
    front_threshold: float = 45.0
    """A camera within this many degrees of azimuth 0 sees the front."""
    back_threshold: float = 45.0
    """A camera within this many degrees of azimuth 180 sees the back."""
    overhead_threshold: float = 60.0
    """A camera above this elevation (degrees) sees the top; overrides front/side/back."""
    use_perp_neg: bool = False
    """Perp-Neg (Armandpour et al. 2023): interpolate view prompts; other views become perpendicular negatives."""

    def __post_init__(self) -> None:
        for name in ("front_threshold", "back_threshold"):
            value = getattr(self, name)
            if not 0.0 <= value <= 180.0:
                raise ValueError(f"prompt.{name} must be in [0, 180] degrees, got {value}")
        if not -90.0 <= self.overhead_threshold <= 90.0:
            raise ValueError(f"prompt.overhead_threshold must be in [-90, 90] degrees, got {self.overhead_threshold}")
        if self.use_perp_neg and not self.view_dependent:
            raise ValueError("prompt.use_perp_neg needs prompt.view_dependent=true (it mixes the view prompts)")


@dataclass
class PromptBatch:
    """Text conditions for B cameras."""

    cond: Tensor  # [B, L, D] view-dependent prompt embedding (Perp-Neg: the interpolated positive)
    uncond: Tensor  # [B, L, D] negative-prompt embedding
    directions: list[str]  # B view directions, for logging and debug images
    neg: Tensor | None = None  # [B, K, L, D] Perp-Neg negative embeddings, None without Perp-Neg
    neg_weights: Tensor | None = None  # [B, K] Perp-Neg weights (<= 0 pushes away)
    plain: Tensor | None = None  # [B, L, D] the prompt without a view suffix (VSD's estimator reads it)

    def __len__(self) -> int:
        return self.cond.shape[0]


def _decay(abc: tuple[float, float, float], r: float) -> float:
    a, b, c = abc
    return a * math.exp(-b * r) + c


class PromptProcessor:
    """Encodes a prompt's view variants once and hands out per-camera text conditions."""

    def __init__(self, prior: "DiffusionPrior", cfg: PromptConfig) -> None:
        if not cfg.prompt or not cfg.prompt.strip():
            raise ConfigError('prompt is empty; pass prompt="a red mug"')
        self.prior, self.cfg = prior, cfg
        prompt = cfg.prompt.strip()
        self.prompts = {d: f"{prompt}, {d} view" for d in DIRECTIONS} if cfg.view_dependent else {}
        texts = [prompt, cfg.negative_prompt, *self.prompts.values()]
        embeddings = prior.encode_text(texts)  # [2 + 4, L, D]
        self.embedding, self.negative = embeddings[0], embeddings[1]  # [L, D]
        self.view_embeddings = dict(zip(self.prompts, embeddings[2:]))  # direction -> [L, D]

    def __call__(self, cameras: _HasViewAngles) -> PromptBatch:
        """Text conditions for the B cameras (anything with `.azimuth` and `.elevation` in degrees, ``[B]``)."""
        cfg = self.cfg
        directions = view_directions(
            cameras.azimuth, cameras.elevation, cfg.front_threshold, cfg.back_threshold, cfg.overhead_threshold
        )
        B = len(directions)
        uncond = self.negative.expand(B, -1, -1)  # [B, L, D]
        plain = self.embedding.expand(B, -1, -1)  # [B, L, D]
        if cfg.use_perp_neg:
            return self._perp_neg(cameras, directions, uncond, plain)
        cond = torch.stack([self.view_embeddings[d] for d in directions]) if cfg.view_dependent else plain
        return PromptBatch(cond, uncond, directions, plain=plain)

    def _perp_neg(self, cameras: _HasViewAngles, directions: list[str], uncond: Tensor, plain: Tensor) -> PromptBatch:
        """Interpolated positives and weighted negatives, per camera (ALGORITHMS.md §1, Perp-Neg)."""
        E = {d: e.float() for d, e in self.view_embeddings.items()}
        a = wrap_azimuth(cameras.azimuth).abs().tolist()
        pos, neg, weights = [], [], []
        for a_i, d in zip(a, directions):
            if d == "overhead":
                pos.append(E["overhead"])
                neg.append(torch.stack([E["front"], E["side"]]))
                weights.append([0.0, 0.0])
            elif a_i < 90.0:  # between front (r = 1) and side (r = 0)
                r = 1.0 - a_i / 90.0
                pos.append(r * E["front"] + (1.0 - r) * E["side"])
                neg.append(torch.stack([E["front"], E["side"]]))
                weights.append([-_decay(PERP_NEG_F_FS, r), -_decay(PERP_NEG_F_SF, 1.0 - r)])
            else:  # between side (r = 1) and back (r = 0)
                r = 2.0 - a_i / 90.0
                pos.append(r * E["side"] + (1.0 - r) * E["back"])
                neg.append(torch.stack([E["side"], E["front"]]))
                weights.append([-_decay(PERP_NEG_F_SB, r), -_decay(PERP_NEG_F_FSB, r)])
        dtype = uncond.dtype
        return PromptBatch(
            cond=torch.stack(pos).to(dtype),
            uncond=uncond,
            directions=directions,
            neg=torch.stack(neg).to(dtype),  # [B, 2, L, D]
            neg_weights=torch.tensor(weights, device=uncond.device),  # [B, 2]
            plain=plain,
        )

"""Regularizers of text-to-3D, in one module: pure functions on rendered tensors, plus their weights.

Every system adds the same few terms to its guidance loss; they live here once instead of being
pasted into each recipe. Two kinds of input:

- per-pixel: ``alpha [C, H, W, 1]`` (any shape works), the accumulated opacity of a render;
- per-sample: the packed ray samples of a volume render (a `SampleRecord` of
  gen3d.rendering.types: ``weights [S]``, ``normals [S, 3]`` or None, ``directions [S, 3]``,
  ``ray_indices [S]`` long in ``[0, n_rays)``, ``n_rays``), sorted by ray.

The terms:

- `orientation_loss`: sum_i sg(w_i) max(0, n_i . d_i)^2 per ray. DreamFusion (Poole et al. 2022),
  appendix "orientation loss".
- `sparsity_loss`: mean sqrt(alpha^2 + eps). The opacity penalty against fog of Dream Fields (Jain
  et al. 2022) and DreamFusion, in stable-dreamfusion's / threestudio's smoothed-L1 form.
- `opaque_loss`: mean -(a log a + (1 - a) log(1 - a)) of alpha, threestudio's "opaque" binary entropy.
- `entropy_loss`: mean over hit rays of -sum_i p_i log p_i with p_i = w_i / sum_j w_j, InfoNeRF's
  ray entropy (Kim et al. 2022).

`LossWeights` holds one `Schedule` per term (threestudio's ``lambda_orient: [0, 10, 1000, 5000]``)
and `LossWeights.terms` returns the weighted terms at a step, computing only those whose weight
is not 0.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from gen3d.schedules import Schedule, check_schedule, schedule_value

if TYPE_CHECKING:
    from gen3d.rendering.types import SampleRecord

__all__ = [
    "LossWeights",
    "binary_entropy",
    "entropy_loss",
    "opaque_loss",
    "orientation_loss",
    "sparsity_loss",
]


def _check_alpha(alpha: Any, who: str) -> None:
    if not isinstance(alpha, Tensor) or not alpha.is_floating_point() or alpha.numel() == 0:
        shape = tuple(alpha.shape) if isinstance(alpha, Tensor) else type(alpha).__name__
        dtype = getattr(alpha, "dtype", None)
        raise ValueError(f"{who}: alpha must be a non-empty float tensor (e.g. [C, H, W, 1]), got {shape} {dtype}")


def _check_samples(who: str, weights: Tensor, ray_indices: Tensor, n_rays: int, **per_sample3: Tensor) -> None:
    """Raise ValueError unless weights [S] float, ray_indices [S] integer in [0, n_rays), others [S, 3] float."""
    if not isinstance(weights, Tensor) or weights.dim() != 1 or not weights.is_floating_point():
        raise ValueError(f"{who}: weights must be a float tensor [S], got "
                         f"{tuple(getattr(weights, 'shape', ()))} {getattr(weights, 'dtype', type(weights).__name__)}")
    S = weights.shape[0]
    if (not isinstance(ray_indices, Tensor) or ray_indices.shape != (S,) or ray_indices.is_floating_point()
            or ray_indices.dtype == torch.bool):
        raise ValueError(f"{who}: ray_indices must be an integer tensor [S] = [{S}], got "
                         f"{tuple(getattr(ray_indices, 'shape', ()))} {getattr(ray_indices, 'dtype', None)}")
    if isinstance(n_rays, bool) or not isinstance(n_rays, int) or n_rays < 1:
        raise ValueError(f"{who}: n_rays must be an int >= 1, got {n_rays!r}")
    if S and (int(ray_indices.min()) < 0 or int(ray_indices.max()) >= n_rays):
        raise ValueError(f"{who}: ray_indices must lie in [0, n_rays) = [0, {n_rays}), got values in "
                         f"[{int(ray_indices.min())}, {int(ray_indices.max())}]")
    for name, t in per_sample3.items():
        if not isinstance(t, Tensor) or t.shape != (S, 3) or not t.is_floating_point():
            raise ValueError(f"{who}: {name} must be a float tensor [S, 3] = [{S}, 3], got "
                             f"{tuple(getattr(t, 'shape', ()))} {getattr(t, 'dtype', type(t).__name__)}")


def _per_ray_sum(values: Tensor, ray_indices: Tensor, n_rays: int) -> Tensor:
    """Sum packed per-sample `values` [S] into their rays -> [n_rays]."""
    return torch.zeros(n_rays, dtype=values.dtype, device=values.device).index_add(0, ray_indices.long(), values)


def orientation_loss(weights: Tensor, normals: Tensor, directions: Tensor, ray_indices: Tensor, n_rays: int) -> Tensor:
    """DreamFusion's orientation loss: penalize visible normals that face away from the camera -> scalar.

    Poole et al. 2022, "DreamFusion: Text-to-3D using 2D Diffusion", appendix ("orientation loss"):

        R_orient(ray) = sum_i stopgrad(w_i) * max(0, n_i . d_i)^2

    with w_i the rendering weight of sample i, n_i its unit outward normal and d_i the unit ray
    direction *from the camera into the scene*: a normal facing the camera has n . d < 0 and costs
    nothing, a back-facing one that is visible costs (n . d)^2. The weights are detached, so the loss
    turns normals (the density's gradient) without making samples more transparent to dodge it.

    Normalization (a choice; DreamFusion sums): the mean over the rays that carry any weight
    (sum_i w_i > 0), so its scale does not depend on how much of the image is background; 0 when no
    ray carries weight. threestudio divides the sum by the same count.

    weights: [S] rendering weights; normals: [S, 3] unit outward normals (from `Field.normals`);
    directions: [S, 3] ray directions from the camera (normalized here); ray_indices: [S] ray of each
    sample in [0, n_rays); n_rays: R.
    """
    _check_samples("orientation_loss", weights, ray_indices, n_rays, normals=normals, directions=directions)
    d = torch.nn.functional.normalize(directions.detach(), dim=-1)  # [S, 3]
    facing_away = (normals * d).sum(-1).clamp_min(0.0)  # [S] max(0, n . d)
    w = weights.detach()  # [S]
    per_ray = _per_ray_sum(w * facing_away**2, ray_indices, n_rays)  # [R]
    hit = _per_ray_sum(w, ray_indices, n_rays) > 0  # [R]
    return per_ray.sum() / hit.sum().clamp_min(1)


def sparsity_loss(alpha: Tensor, eps: float = 0.01) -> Tensor:
    """Penalize accumulated opacity everywhere: ``mean(sqrt(alpha^2 + eps))`` -> scalar.

    In the line of Dream Fields' opacity penalty (Jain et al. 2022, "Zero-Shot Text-Guided Object
    Generation with Dream Fields"), which keeps score distillation from filling empty space with fog;
    written as stable-dreamfusion / threestudio do (their "sparsity" term, eps = 0.01): a smoothed L1 whose
    gradient alpha / sqrt(alpha^2 + eps) fades near alpha = 0 instead of jumping like |alpha|'s.
    eps = 0 gives plain L1 (alpha >= 0). alpha: any shape, e.g. [C, H, W, 1], in [0, 1].
    """
    _check_alpha(alpha, "sparsity_loss")
    if not eps >= 0:
        raise ValueError(f"sparsity_loss: eps must be >= 0, got {eps!r}")
    if eps == 0:
        return alpha.abs().mean()
    return (alpha.square() + eps).sqrt().mean()


def binary_entropy(alpha: Tensor, eps: float = 1e-4) -> Tensor:
    """Mean binary entropy ``-(a log a + (1 - a) log(1 - a))`` of alpha in [0, 1] -> scalar (nats).

    0 when every value is 0 or 1, log 2 at 0.5. alpha is clamped to [eps, 1 - eps] so the logs stay
    finite (the gradient is then 0 at exactly 0 or 1). alpha: any shape.
    """
    a = alpha.clamp(eps, 1 - eps)
    return -(a * torch.log(a) + (1 - a) * torch.log(1 - a)).mean()


def opaque_loss(alpha: Tensor, eps: float = 1e-4) -> Tensor:
    """Push every pixel to fully opaque or fully empty: the mean `binary_entropy` of alpha -> scalar.

    threestudio's "opaque" regularizer (its binary cross-entropy of the opacity with itself), used by
    DreamGaussian-style and NeRF systems against SDS's semi-transparent surfaces. alpha: any shape,
    e.g. [C, H, W, 1], in [0, 1].
    """
    _check_alpha(alpha, "opaque_loss")
    if not 0 < eps < 0.5:
        raise ValueError(f"opaque_loss: eps must be in (0, 0.5), got {eps!r}")
    return binary_entropy(alpha, eps)


def entropy_loss(weights: Tensor, ray_indices: Tensor, n_rays: int, min_opacity: float = 0.1) -> Tensor:
    """InfoNeRF's ray entropy: make each ray's weight distribution peaked (one surface) -> scalar.

    Kim et al. 2022, "InfoNeRF: Ray Entropy Minimization for Few-Shot Neural Volume Rendering",
    Sec. 3 (ray entropy loss): with p_i = w_i / sum_j w_j the normalized weights along a ray,

        H(ray) = -sum_i p_i log p_i,    loss = mean of H over rays with sum_j w_j >= min_opacity.

    A single opaque surface gives H = 0; fog spread over k samples gives up to log k. Because p is
    normalized, the loss does not care how opaque a ray is (that is `sparsity_loss`/`opaque_loss`'s
    job); rays that hit (almost) nothing are left out as in InfoNeRF's mask, whose threshold is
    ``min_opacity``. Difference from InfoNeRF: p is built from the rendering weights w_i (InfoNeRF
    uses the sample opacities alpha_i). 0 when no ray passes the mask.

    weights: [S] rendering weights; ray_indices: [S] in [0, n_rays); n_rays: R.
    """
    _check_samples("entropy_loss", weights, ray_indices, n_rays)
    if not 0 <= min_opacity <= 1:
        raise ValueError(f"entropy_loss: min_opacity must be in [0, 1], got {min_opacity!r}")
    total = _per_ray_sum(weights, ray_indices, n_rays)  # [R]
    p = weights / total.clamp_min(1e-10)[ray_indices]  # [S]
    h = _per_ray_sum(-p * torch.log(p.clamp_min(1e-10)), ray_indices, n_rays)  # [R]
    keep = (total.detach() >= min_opacity) & (total.detach() > 0)  # [R]
    return (h * keep).sum() / keep.sum().clamp_min(1)


# the terms of LossWeights, in order; LossWeights.lambda_<term> is the weight of each
_TERMS = ("orient", "sparsity", "opaque", "entropy")


@dataclass
class LossWeights:
    """Weights of the regularizers, each a schedule over training steps (gen3d.schedules).

    A schedule is a number, ``[v0, v1, end]``, ``[start, v0, v1, end]`` or ``[s0, v0, s1, v1, ...]``,
    as in threestudio (``lambda_orient: [0, 10, 1000, 5000]``: 10 at step 0 rising to 1000 at step
    5000). A term whose weight is 0 at a step is not computed at that step.
    """

    lambda_orient: Schedule = 0.0
    """DreamFusion's orientation loss on per-sample normals (needs a renderer that computes normals)."""
    lambda_sparsity: Schedule = 0.0
    """Opacity penalty mean sqrt(alpha^2 + 0.01) against fog in empty space."""
    lambda_opaque: Schedule = 0.0
    """Binary entropy of the rendered alpha: every pixel fully opaque or fully empty."""
    lambda_entropy: Schedule = 0.0
    """InfoNeRF ray entropy of the per-sample weights: one surface per ray."""

    def __post_init__(self) -> None:
        for f in fields(self):
            check_schedule(getattr(self, f.name), f.name)

    def at(self, step: int, max_steps: int = 1) -> dict[str, float]:
        """The weights at `step` of a run of `max_steps`: {"orient": ..., "sparsity": ..., ...}."""
        out = {}
        for term in _TERMS:
            value = schedule_value(getattr(self, f"lambda_{term}"), step, max_steps)
            if value < 0:
                raise ValueError(f"lambda_{term} must be >= 0, got {value} at step {step}")
            out[term] = value
        return out

    def terms(self, step: int, max_steps: int = 1, *, alpha: Tensor | None = None,
              samples: SampleRecord | None = None) -> dict[str, Tensor]:
        """The weighted regularizers at `step`, e.g. {"orient": lambda * loss, ...}; add them to the loss.

        alpha: [C, H, W, 1] rendered opacity (``RenderOutput.alpha``; for sparsity and opaque);
        samples: the render's `SampleRecord` (``RenderOutput.samples``; for orient and entropy). Terms whose weight is 0 at `step` are left out and cost nothing; a term
        with a weight > 0 whose input is missing raises ValueError.
        """
        out: dict[str, Tensor] = {}
        for term, weight in self.at(step, max_steps).items():
            if weight == 0:
                continue
            if term in ("sparsity", "opaque"):
                if alpha is None:
                    raise ValueError(f"lambda_{term} = {weight} needs the rendered alpha; pass alpha=out.alpha")
                loss = sparsity_loss(alpha) if term == "sparsity" else opaque_loss(alpha)
            else:
                if samples is None:
                    raise ValueError(f"lambda_{term} = {weight} needs the render's per-sample record; pass "
                                     "samples=out.samples from a volume renderer (Gaussian renders have none)")
                if term == "orient":
                    if getattr(samples, "normals", None) is None:
                        raise ValueError(f"lambda_orient = {weight} needs per-sample normals, but samples.normals is "
                                         "None; render with normals (e.g. a shaded material) or set lambda_orient: 0")
                    loss = orientation_loss(samples.weights, samples.normals, samples.directions,
                                            samples.ray_indices, samples.n_rays)
                else:
                    loss = entropy_loss(samples.weights, samples.ray_indices, samples.n_rays)
            out[term] = weight * loss
        return out


def grads_finite(params) -> bool:
    """Whether every gradient of `params` is finite (one device sync): the check before an optimizer step that the
    systems (`System.optimize`) and the world trainers (`skip_nonfinite`) share."""
    grads = [p.grad for p in params if p.grad is not None]
    return not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())

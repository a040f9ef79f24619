"""Score-distillation guidances: each a short class over a `DiffusionPrior` returning a `GuidanceOutput`.

``guidance.type`` in a config picks one (`GuidanceConfig`); `build_guidance` builds it:

- ``sds``: Score Distillation Sampling (DreamFusion), `gen3d.guidance.sds`;
- ``vsd``: Variational Score Distillation with a camera-conditioned LoRA estimator (ProlificDreamer), `.vsd`;
- ``cds``: consistency distillation with a fixed noise on the probability-flow ODE (Consistent3D), `.cds`;
- ``asd``: asynchronous score distillation with a shifted timestep (ScaleDreamer), `.asd`.

Perp-Neg (Armandpour et al. 2023) works with all of them: it lives in the prompts
(``use_perp_neg``) and in `DiffusionPrior.predict_noise_perp_neg`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gen3d.guidance.asd import ASDGuidance
from gen3d.guidance.base import Guidance, GuidanceOutput
from gen3d.guidance.cds import CDSGuidance
from gen3d.guidance.config import ASDConfig, CDSConfig, GuidanceConfig, VSDConfig
from gen3d.guidance.sds import SDSGuidance
from gen3d.guidance.vsd import VSDGuidance

if TYPE_CHECKING:
    from gen3d.priors.diffusion import DiffusionPrior

GUIDANCES: dict[str, type[Guidance]] = {
    "sds": SDSGuidance,
    "vsd": VSDGuidance,
    "cds": CDSGuidance,
    "asd": ASDGuidance,
}


def build_guidance(prior: "DiffusionPrior", cfg: GuidanceConfig, seed: int = 0) -> Guidance:
    """The guidance ``cfg.type`` names, over `prior`; `seed` initialises VSD's LoRA estimator."""
    if cfg.type == "vsd":
        return VSDGuidance(prior, cfg, seed=seed)
    return GUIDANCES[cfg.type](prior, cfg)


__all__ = ["GUIDANCES", "ASDConfig", "ASDGuidance", "CDSConfig", "CDSGuidance", "Guidance", "GuidanceConfig",
           "GuidanceOutput", "SDSGuidance", "VSDConfig", "VSDGuidance", "build_guidance"]

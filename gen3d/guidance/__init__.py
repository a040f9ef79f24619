"""Score-distillation guidances: each a short class over a `DiffusionPrior` returning a `GuidanceOutput`.

`GUIDANCES` maps a config name to its (config dataclass, guidance class); a guidance is built as
``guidance_cls(prior, config_cls(**options))``.
"""

from gen3d.guidance.base import Guidance, GuidanceOutput
from gen3d.guidance.sds import SDSConfig, SDSGuidance

GUIDANCES: dict[str, tuple[type, type]] = {
    "sds": (SDSConfig, SDSGuidance),
}

__all__ = ["GUIDANCES", "Guidance", "GuidanceOutput", "SDSConfig", "SDSGuidance"]

"""gen3d: text or one image to 3D and 4D assets.

Layers (dependencies point down only; see the README):
ops -> representations -> rendering / priors -> guidance -> systems -> CLI and viewer.

Dimension letters used in shape comments everywhere:
N gaussians, C cameras, R rays, S samples per ray, B batch, H height, W width, D channels, T timesteps.
"""

__version__ = "0.1.0"

from gen3d.errors import Gen3dError

__all__ = ["Gen3dError", "__version__"]

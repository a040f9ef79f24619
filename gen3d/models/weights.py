"""Loading the weights of gen3d's exported models (a folder of ``model.safetensors`` + ``config.json``)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from gen3d.errors import Gen3dError


def load_weights(net: nn.Module, folder: Path, label: str) -> nn.Module:
    """``folder/model.safetensors`` into `net` (float16 files are cast to the net's float32), or one clear error
    naming `label` when the weights do not fit the config the net was built from."""
    from safetensors.torch import load_file

    try:
        net.load_state_dict(load_file(str(Path(folder) / "model.safetensors")))
    except (RuntimeError, OSError) as exc:
        raise Gen3dError(f"{label}: model.safetensors does not fit its config.json "
                         f"({type(exc).__name__}: {str(exc)[:200]})") from None
    return net

"""Videos and images of renders: turntable mp4s (gif without an encoder), PNGs and image grids.

Frames are float in [0, 1] or uint8, as torch tensors or numpy arrays, channels last. Every file is
written through `gen3d.io.atomic_path`, so a failed write leaves an existing file untouched.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch

from gen3d.errors import Gen3dError
from gen3d.io import atomic_path


def to_uint8(images) -> np.ndarray:
    """Images [..., D] float in [0, 1] or uint8 (tensor or array) -> uint8 numpy array."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images
    if images.dtype == np.bool_:
        return images.astype(np.uint8) * 255
    return (np.nan_to_num(images.astype(np.float32), nan=0.0).clip(0.0, 1.0) * 255.0).round().astype(np.uint8)


def _ffmpeg_exe() -> str | None:
    """Path of an ffmpeg binary (the one bundled with imageio-ffmpeg), or None."""
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except Exception:  # noqa: BLE001 - any failure to find a binary means: no encoder
        return None


def write_video(path: str | os.PathLike, frames, fps: float = 24) -> Path:
    """Write frames [T, H, W, 3] (or [T, H, W, 4], alpha dropped) and return the path actually written.

    `.mp4` is H.264 (libx264, yuv420p, which needs even sizes: odd sizes are padded by repeating the
    last row / column) through imageio-ffmpeg's bundled ffmpeg. When no encoder is available or
    encoding fails, a `.gif` next to it is written instead, with a warning. `.gif` writes a gif.
    """
    path = Path(path)
    video = to_uint8(frames)
    if video.ndim != 4 or video.shape[-1] not in (3, 4) or video.shape[0] < 1:
        raise ValueError(f"write_video: frames must be [T>=1, H, W, 3|4], got {list(video.shape)}")
    video = np.ascontiguousarray(video[..., :3])
    suffix = path.suffix.lower()
    if suffix not in (".mp4", ".gif"):
        raise ValueError(f"write_video: {path.name!r} must end in .mp4 or .gif")
    if suffix == ".mp4":
        exe = _ffmpeg_exe()
        if exe is not None:
            try:
                _write_mp4(path, video, fps)
                return path
            except Gen3dError:  # the file could not be written (disk full, not writable): a gif would fail too
                raise
            except Exception as exc:  # noqa: BLE001 - fall back to gif on any encoder failure
                reason = f"ffmpeg failed ({exc})"
        else:
            reason = "no ffmpeg binary (install imageio-ffmpeg)"
        path = path.with_suffix(".gif")
        warnings.warn(f"write_video: cannot encode mp4: {reason}; writing {path.name} instead", stacklevel=2)
    _write_gif(path, video, fps)
    return path


def _write_mp4(path: Path, video: np.ndarray, fps: float) -> None:
    """H.264 through the ffmpeg binary, whose exit status is checked (imageio-ffmpeg's writer ignores it, so a
    disk that fills up would leave a truncated mp4 under the final name): a failed write of the file raises the
    OSError it met, which `atomic_path` reports; any other failure a RuntimeError (`write_video` falls back to gif)."""
    import errno
    import signal
    import subprocess
    from fractions import Fraction

    H, W = video.shape[1:3]
    video = np.pad(video, ((0, 0), (0, H % 2), (0, W % 2), (0, 0)), mode="edge")
    with atomic_path(path) as tmp:
        cmd = [_ffmpeg_exe(), "-y", "-v", "error", "-f", "rawvideo", "-pix_fmt", "rgb24",
               "-s", f"{video.shape[2]}x{video.shape[1]}", "-r", str(Fraction(fps).limit_denominator()), "-i", "-",
               "-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", "18", "-movflags", "+faststart", str(tmp)]
        proc = subprocess.run(cmd, input=np.ascontiguousarray(video).tobytes(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
        if proc.returncode == -signal.SIGXFSZ:  # over the file size limit (subprocess restores the default action)
            raise OSError(errno.EFBIG, os.strerror(errno.EFBIG), str(tmp))
        if proc.returncode != 0:
            message = proc.stderr.decode(errors="replace")
            for code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES):
                if os.strerror(code) in message:  # ffmpeg names the OS error of a failed write
                    raise OSError(code, os.strerror(code), str(tmp))
            raise RuntimeError(f"ffmpeg exited with status {proc.returncode}: {message.strip()[-300:]}")


def _write_gif(path: Path, video: np.ndarray, fps: float) -> None:
    import imageio.v3 as iio

    with atomic_path(path) as tmp:
        iio.imwrite(tmp, video, extension=".gif", duration=1000.0 / fps, loop=0)


def save_image(path: str | os.PathLike, image) -> Path:
    """Write an image [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] (float in [0, 1] or uint8) as PNG, atomically."""
    import imageio.v3 as iio

    path = Path(path)
    img = to_uint8(image)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if not (img.ndim == 2 or (img.ndim == 3 and img.shape[-1] in (3, 4))):
        raise ValueError(f"save_image: image must be [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], got {list(img.shape)}")
    with atomic_path(path) as tmp:
        iio.imwrite(tmp, img, extension=path.suffix or ".png")
    return path


def image_grid(images, nrow: int = 8, padding: int = 0, pad_value: float = 1.0):
    """Tile images [N, H, W, D] into one image [rows * H', nrow * W', D] (H' = H + padding), row-major.

    Returns a tensor for tensor input and an array for array input, of the input's dtype.
    Empty cells of the last row and the padding take `pad_value` (in [0, 1]; scaled for uint8).
    """
    is_tensor = isinstance(images, torch.Tensor)
    arr = images.detach().cpu().numpy() if is_tensor else np.asarray(images)
    if arr.ndim != 4:
        raise ValueError(f"image_grid: images must be [N, H, W, D], got {list(arr.shape)}")
    if nrow < 1:
        raise ValueError(f"image_grid: nrow must be >= 1, got {nrow}")
    N, H, W, D = arr.shape
    cols = min(nrow, max(N, 1))
    rows = -(-N // cols) if N else 0
    fill = pad_value * 255 if arr.dtype == np.uint8 else pad_value
    grid = np.full((rows * (H + padding) - padding if rows else 0, cols * (W + padding) - padding, D), fill, dtype=arr.dtype)
    for n in range(N):
        r, c = divmod(n, cols)
        grid[r * (H + padding):r * (H + padding) + H, c * (W + padding):c * (W + padding) + W] = arr[n]
    return torch.from_numpy(grid).to(images.device) if is_tensor else grid

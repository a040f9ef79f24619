"""The input image of image-to-3D: read anything PIL reads, find the object, center it, scale it.

`load_reference(path)` returns the object on white at a fixed size and fill ratio, with its mask,
the way Zero-1-to-3's and DreamGaussian's preprocessing prepares an input view:

1. **Read.** Every mode PIL opens becomes 8-bit RGB(A): palette and grayscale images are converted,
   16-bit and 32-bit grayscale are rescaled by their range (not clipped), CMYK is converted, an
   animated image contributes its first frame, with a warning (its motion is video-to-4D's input).
2. **Foreground.** From the alpha channel when it has one that is not fully opaque (alpha > 50%);
   otherwise from the background color: the median of the one-pixel border, which must be one plain
   color (its pixels within `tolerance` of the median for 95% of the border), and every pixel
   farther than `tolerance` from it (max over channels) is foreground. Specks smaller than 1% of the
   largest piece are dropped (holes are kept: a mug's handle shows the background through it).
3. **Recenter and rescale.** The foreground's bounding box is centered in a `size` x `size` square
   and scaled so that its longer side spans `fill_ratio` of it (Zero123's and DreamGaussian's inputs:
   0.8-0.85); the rest is white, and the mask is resampled the same way. ``recenter=False`` keeps the
   image's framing instead (when its camera is known, e.g. a render).

Every failure is a `Gen3dError` that says what was wrong and what to do, never another exception (a
property test feeds the reader arbitrary bytes): a missing path, a folder, an empty, truncated or damaged
file, a file that is not an image, an image smaller than 16 px or larger than PIL's 89 megapixels, no
foreground, a background that is not plain.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from gen3d.errors import Gen3dError

__all__ = ["ReferenceImage", "load_clip", "load_reference", "prepare_clip", "prepare_reference"]

MIN_SIDE = 16
MAX_PIXELS = 89_478_485  # PIL's own limit against decompression bombs


@dataclass
class ReferenceImage:
    """An input view ready for image-to-3D."""

    rgb: Tensor  # [S, S, 3] in [0, 1], the object over white
    mask: Tensor  # [S, S] in [0, 1], the object's coverage
    source: str  # where it came from
    source_size: tuple[int, int]  # (width, height) of the file
    mask_from: str  # "alpha" or "background"
    fill_ratio: float


def _read(path: Path, warn: Callable[[str], None] | None = None) -> np.ndarray:
    """The image at `path` as float32 [H, W, 3 or 4] in [0, 1] (see the module docstring, step 1).

    Every file that is not a readable image of at least MIN_SIDE pixels raises a `Gen3dError`; an animated image
    is read as its first frame and `warn` (default: `warnings.warn`) says so.
    """
    import warnings

    from PIL import Image

    if path.is_dir():
        raise Gen3dError(f"image '{path}' is a folder; pass one image file (a folder of frames is a video: "
                         "gen3d run video-to-4d video=<folder>)")
    if not path.is_file():
        raise Gen3dError(f"image '{path}' does not exist; check the path")
    if path.stat().st_size == 0:
        raise Gen3dError(f"image '{path}' is empty (0 bytes); pass a PNG, JPEG or WebP file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is checked below
            image = Image.open(path)
        with image:
            if image.width < MIN_SIDE or image.height < MIN_SIDE:
                raise Gen3dError(f"image '{path}' is {image.width}x{image.height} pixels; image-to-3D needs at least "
                                 f"{MIN_SIDE}x{MIN_SIDE} (256x256 or more is best)")
            if image.width * image.height > MAX_PIXELS:
                raise Gen3dError(f"image '{path}' is {image.width}x{image.height} pixels, more than the "
                                 f"{MAX_PIXELS / 1e6:.0f} million read; downscale it (1024x1024 is plenty)")
            frames = getattr(image, "n_frames", 1)
            image.seek(0)
            image.load()
            array = _to_float(image)
    except Gen3dError:
        raise
    except PermissionError as exc:
        raise Gen3dError(f"cannot open image '{path}' ({exc.strerror}); make it readable") from None
    except Exception as exc:  # PIL's decoders raise many types on a malformed file (OSError, SyntaxError, ...)
        raise Gen3dError(f"cannot read '{path}' as an image ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                         "); it is damaged or not an image: pass a PNG, JPEG or WebP file") from None
    if frames > 1:
        message = (f"image '{path}' is animated ({frames} frames); image-to-3D uses its first frame (for its motion: "
                   "gen3d run video-to-4d video=<file>)")
        warn(message) if warn is not None else warnings.warn(message, stacklevel=3)
    if not np.isfinite(array).all():  # a float image with NaN or inf: such pixels are black
        array = np.nan_to_num(array, nan=0.0, posinf=1.0, neginf=0.0)
    return array


def _to_float(image) -> np.ndarray:
    """A loaded PIL image of any mode as float32 [H, W, 3 or 4] in [0, 1]."""
    mode = image.mode
    if mode.startswith("I;16"):  # 16-bit gray: the file's range is 0..65535, whatever the values in it
        gray = np.asarray(image, dtype=np.float64) / 65535.0
    elif mode in ("I", "F"):  # 32-bit gray: rescale by the range the values use, do not clip
        gray = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0)
        top = float(gray.max()) if gray.size else 1.0
        if mode == "F":
            top = max(top, 1.0)
        else:
            top = 255.0 if top <= 255 else 65535.0 if top <= 65535 else top
        gray = gray / top
    else:
        has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in image.info)
        image = image.convert("RGBA" if has_alpha else "RGB")
        return np.asarray(image, dtype=np.float32) / 255.0
    gray = np.clip(gray, 0.0, 1.0).astype(np.float32)
    return np.repeat(gray[..., None], 3, axis=-1)


def _components(mask: np.ndarray, min_ratio: float = 0.01) -> np.ndarray:
    """`mask` without connected pieces smaller than `min_ratio` of the largest."""
    from scipy.ndimage import label

    labels, n = label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    keep = np.flatnonzero(sizes >= min_ratio * sizes.max()) + 1
    return np.isin(labels, keep)


def prepare_reference(image: np.ndarray, size: int = 256, fill_ratio: float = 0.85, tolerance: float = 0.1,
                      source: str = "<array>", recenter: bool = True) -> ReferenceImage:
    """Foreground, recentering and rescaling of an image float [H, W, 3 or 4] in [0, 1] (steps 2 and 3).

    recenter=False keeps the image's own framing (for an image whose camera is known): the image is padded
    to a square around its center and resized to `size`, and `fill_ratio` is ignored.
    """
    _check_sizes(size, fill_ratio)
    rgb, mask, soft, mask_from = _foreground(image, tolerance, source)
    return _place(rgb, mask, soft, mask_from, _box(mask), size, fill_ratio, source, recenter)


def prepare_clip(images: list[np.ndarray], size: int = 256, fill_ratio: float = 0.85, tolerance: float = 0.1,
                 source: str = "<array>", recenter: bool = True) -> list[ReferenceImage]:
    """`prepare_reference` for the frames of a video, all cropped and scaled the same way (the box around the
    union of their foregrounds), so that the object's motion in the frame is kept."""
    _check_sizes(size, fill_ratio)
    parts = [_foreground(im, tolerance, f"{source} frame {i}") for i, im in enumerate(images)]
    if len({p[0].shape for p in parts}) > 1:
        raise Gen3dError(f"the frames of '{source}' differ in size; a video's frames must all be the same size")
    boxes = np.array([_box(p[1]) for p in parts])
    box = (boxes[:, 0].min(), boxes[:, 1].max(), boxes[:, 2].min(), boxes[:, 3].max())
    return [_place(*p, box, size, fill_ratio, source, recenter) for p in parts]


def _check_sizes(size: int, fill_ratio: float) -> None:
    if not 0.1 <= fill_ratio <= 1.0:
        raise ValueError(f"fill_ratio must be in [0.1, 1], got {fill_ratio}")
    if not MIN_SIDE <= size <= 4096:
        raise ValueError(f"size must be in {MIN_SIDE}..4096 pixels, got {size}")


def _foreground(image: np.ndarray, tolerance: float, source: str):
    """(rgb, mask, soft mask, where the mask came from) of an image float [H, W, 3 or 4] (step 2)."""
    H, W = image.shape[:2]
    rgb = image[..., :3]
    alpha = image[..., 3] if image.shape[-1] == 4 else None
    if alpha is not None and alpha.min() < 0.5:
        mask_from, soft = "alpha", alpha
        mask = alpha > 0.5
    else:
        border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])  # [2 (H + W), 3]
        background = np.median(border, axis=0)
        plain = (np.abs(border - background).max(1) <= tolerance).mean()
        if plain < 0.95:
            raise Gen3dError(
                f"'{source}' has no transparency and its border is not one plain color (only {plain:.0%} of the border "
                f"is within {tolerance} of its median color); cut the object out (a PNG with alpha) or photograph it "
                "on a plain background")
        mask_from = "background"
        mask = np.abs(rgb - background).max(-1) > tolerance
        soft = None
    mask = _components(mask)
    count = int(mask.sum())
    if count < max(16, 1e-3 * H * W):
        raise Gen3dError(f"no foreground found in '{source}': {count} of its {H * W} pixels differ from the "
                         + ("transparent background" if mask_from == "alpha" else "background color")
                         + "; is the object missing, or the same color as the background?")
    soft = mask.astype(np.float32) if soft is None else soft * mask  # specks dropped from the alpha too
    return rgb, mask, soft, mask_from


def _box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the mask's bounding box, bottom and right exclusive."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return int(rows[0]), int(rows[-1] + 1), int(cols[0]), int(cols[-1] + 1)


def _place(rgb, mask, soft, mask_from: str, box, size: int, fill_ratio: float, source: str,
           recenter: bool) -> ReferenceImage:
    """The box of the image centered on a white `size` square at `fill_ratio` (step 3)."""
    H, W = rgb.shape[:2]
    top, bottom, left, right = box
    content = max(bottom - top, right - left)
    scale = fill_ratio * size / content
    if not recenter:  # the whole image, centered in a square
        top, bottom, left, right = 0, H, 0, W
        scale = size / max(H, W)
        fill_ratio = content * scale / size
    crop = np.concatenate([rgb[top:bottom, left:right] * soft[top:bottom, left:right, None],
                           soft[top:bottom, left:right, None]], -1)  # premultiplied RGBA
    h, w = max(1, round((bottom - top) * scale)), max(1, round((right - left) * scale))
    x = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1)[None]
    x = torch.nn.functional.interpolate(x, (h, w), mode="area" if scale < 1 else "bilinear",
                                        align_corners=None if scale < 1 else False)[0].permute(1, 2, 0).clamp(0, 1)
    canvas = torch.zeros(size, size, 4)
    y0, x0 = (size - h) // 2, (size - w) // 2
    canvas[y0:y0 + h, x0:x0 + w] = x
    mask_out = canvas[..., 3]
    rgb_out = canvas[..., :3] + (1.0 - mask_out[..., None])  # premultiplied over white
    return ReferenceImage(rgb_out.clamp(0, 1), mask_out, source, (W, H), mask_from, fill_ratio)


def load_reference(path: str | os.PathLike, size: int = 256, fill_ratio: float = 0.85, tolerance: float = 0.1,
                   recenter: bool = True, warn: Callable[[str], None] | None = None) -> ReferenceImage:
    """The object of the image at `path`, centered on white at `size` x `size`, filling `fill_ratio` of it
    (recenter=False: the image's own framing). `warn` receives the warning about an animated image (default:
    `warnings.warn`)."""
    path = Path(path)
    return prepare_reference(_read(path, warn), size, fill_ratio, tolerance, source=str(path), recenter=recenter)


VIDEO_SUFFIXES = (".mp4", ".mov", ".webm", ".mkv", ".avi", ".gif", ".webp", ".png", ".apng")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def read_video(path: str | os.PathLike) -> list[np.ndarray]:
    """Every frame of a video file (mp4 / mov / webm through ffmpeg; animated gif / webp / png through PIL) or of a
    folder of images (sorted by name), as float32 [H, W, 3 or 4] in [0, 1]."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise Gen3dError(f"folder '{path}' holds no images ({', '.join(IMAGE_SUFFIXES)}); pass a video file or a "
                             "folder of frames")
        return [_read(p) for p in files]
    if not path.is_file():
        raise Gen3dError(f"video '{path}' does not exist; pass a video file (mp4, gif, ...) or a folder of frames")
    if path.suffix.lower() in (".mp4", ".mov", ".webm", ".mkv", ".avi"):
        import imageio_ffmpeg

        try:
            reader = imageio_ffmpeg.read_frames(str(path))
            meta = next(reader)
            w, h = meta["size"]
            frames = [np.frombuffer(f, np.uint8).reshape(h, w, 3).astype(np.float32) / 255.0 for f in reader]
        except (OSError, RuntimeError, StopIteration) as exc:
            raise Gen3dError(f"cannot read video '{path}' ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
                             ) from None
        if not frames:
            raise Gen3dError(f"video '{path}' has no frames")
        return frames
    import warnings

    from PIL import Image, ImageSequence

    if path.stat().st_size == 0:
        raise Gen3dError(f"video '{path}' is empty (0 bytes); pass an mp4, an animated gif / webp / png, or a folder "
                         "of frames")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is checked below
            image = Image.open(path)
        with image:
            if image.width * image.height > MAX_PIXELS:
                raise Gen3dError(f"video '{path}' is {image.width}x{image.height} pixels, more than the "
                                 f"{MAX_PIXELS / 1e6:.0f} million read; downscale it")
            frames = [_to_float(frame) for frame in ImageSequence.Iterator(image)]
    except Gen3dError:
        raise
    except Exception as exc:  # PIL's decoders raise many types on a malformed file (OSError, SyntaxError, ...)
        raise Gen3dError(f"cannot read '{path}' as a video ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
                         f"pass an mp4, an animated gif / webp / png, or a folder of frames") from None
    return frames


def load_clip(path: str | os.PathLike, frames: int, size: int = 256, fill_ratio: float = 0.85,
              tolerance: float = 0.1, recenter: bool = True) -> list[ReferenceImage]:
    """`frames` evenly spaced frames of the video at `path` (first and last included), prepared as one clip
    (`prepare_clip`). A video with fewer frames than asked is an error."""
    images = read_video(path)
    if len(images) < frames:
        raise Gen3dError(f"video '{path}' has {len(images)} frame(s) but the run uses frames={frames}; pass a longer "
                         f"video or set frames={len(images)}")
    if any(min(im.shape[:2]) < MIN_SIDE for im in images):
        raise Gen3dError(f"video '{path}' is smaller than {MIN_SIDE}x{MIN_SIDE} pixels")
    pick = np.round(np.linspace(0, len(images) - 1, frames)).astype(int)
    return prepare_clip([images[i] for i in pick], size, fill_ratio, tolerance, source=str(path), recenter=recenter)

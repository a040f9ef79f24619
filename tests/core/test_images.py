"""The image-to-3D input: every image mode, foreground from alpha or a plain background, centering, clear errors."""

import numpy as np
import pytest
import torch
from PIL import Image

from gen3d.errors import Gen3dError
from gen3d.images import load_reference


def disc(size=(120, 80), center=(70, 30), radius=20, color=(200, 30, 30), background=(255, 255, 255)):
    """An RGB image (width, height) with a filled disc."""
    w, h = size
    y, x = np.mgrid[:h, :w]
    inside = (x - center[0]) ** 2 + (y - center[1]) ** 2 <= radius ** 2
    image = np.empty((h, w, 3), np.uint8)
    image[:] = background
    image[inside] = color
    return image, inside


def mask_box(mask, level=0.5):
    m = mask.numpy() > level
    rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
    return rows[0], rows[-1] + 1, cols[0], cols[-1] + 1


@pytest.mark.parametrize("background", [(255, 255, 255), (20, 90, 40)])
def test_plain_background_is_found_and_the_object_centered_at_the_fill_ratio(tmp_path, background):
    image, _ = disc(background=background)
    Image.fromarray(image).save(tmp_path / "in.png")
    ref = load_reference(tmp_path / "in.png", size=128, fill_ratio=0.8)
    assert ref.mask_from == "background" and ref.source_size == (120, 80)
    top, bottom, left, right = mask_box(ref.mask)
    assert abs(max(bottom - top, right - left) - 0.8 * 128) <= 2
    assert abs((top + bottom) / 2 - 64) <= 1 and abs((left + right) / 2 - 64) <= 1
    center = ref.rgb[64, 64].numpy()
    assert np.allclose(center, np.array([200, 30, 30]) / 255, atol=0.02)
    assert np.allclose(ref.rgb[2, 2].numpy(), 1.0)  # white outside, whatever the input's background


def test_alpha_gives_the_mask_even_when_the_color_matches_the_background(tmp_path):
    image, inside = disc(color=(255, 255, 255))  # a white object: invisible to a background test
    rgba = np.dstack([image, np.where(inside, 255, 0).astype(np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "in.png")
    ref = load_reference(tmp_path / "in.png", size=64)
    assert ref.mask_from == "alpha" and ref.mask.max() == 1 and 0.3 < float(ref.mask.mean()) < 0.7


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "I;16", "LA"])
def test_every_mode_reads(tmp_path, mode):
    image, inside = disc(color=(40, 40, 40))
    if mode == "I;16":
        gray = (image[..., 0].astype(np.uint16) * 257)  # the full 16-bit range: must not clip to white
        Image.fromarray(gray).save(tmp_path / "in.png")  # a 16-bit grayscale PNG
    elif mode == "LA":
        Image.fromarray(np.dstack([image[..., 0], np.where(inside, 255, 0)]).astype(np.uint8), "LA").save(tmp_path / "in.png")
    else:
        pil = Image.fromarray(image).convert(mode)
        pil.save(tmp_path / ("in.jpg" if mode == "CMYK" else "in.png"))
    path = next(tmp_path.glob("in.*"))
    ref = load_reference(path, size=64)
    assert 0.3 < float(ref.mask.mean()) < 0.7
    assert float(ref.rgb[32, 32].max()) < 0.3  # the dark disc stays dark


def test_animated_images_use_the_first_frame(tmp_path):
    first, _ = disc(center=(30, 40))
    second = np.full_like(first, 255)
    Image.fromarray(first).save(tmp_path / "a.gif", save_all=True, append_images=[Image.fromarray(second)], duration=100)
    assert load_reference(tmp_path / "a.gif", size=32).mask.max() == 1


def test_small_specks_are_dropped(tmp_path):
    image, _ = disc()
    image[2:4, 2:4] = 0  # a speck of dust in the corner
    Image.fromarray(image).save(tmp_path / "in.png")
    ref = load_reference(tmp_path / "in.png", size=128, fill_ratio=0.8)
    top, bottom, left, right = mask_box(ref.mask)
    assert abs(max(bottom - top, right - left) - 0.8 * 128) <= 2  # the box is the disc's, not disc + speck


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "does not exist"),
    (lambda p: p.write_bytes(b"this is not an image"), "cannot read"),
    (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20), "cannot read"),
    (lambda p: Image.new("RGB", (1, 1)).save(p, format="PNG"), "is 1x1 pixels"),
    (lambda p: Image.new("RGB", (64, 64), (9, 9, 9)).save(p, format="PNG"), "no foreground found"),
    (lambda p: Image.new("RGBA", (64, 64), (9, 9, 9, 0)).save(p, format="PNG"), "no foreground found"),
    (lambda p: Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(p, format="PNG"),
     "border is not one plain color"),
])
def test_bad_images_say_what_is_wrong(tmp_path, make, message):
    path = tmp_path / "in.png"
    make(path)
    with pytest.raises(Gen3dError, match=message):
        load_reference(path)


def test_recenter_false_keeps_the_framing(tmp_path):
    image, inside = disc(size=(80, 80), center=(20, 30), radius=10)
    Image.fromarray(image).save(tmp_path / "in.png")
    ref = load_reference(tmp_path / "in.png", size=40, recenter=False)
    top, bottom, left, right = mask_box(ref.mask)
    assert abs((left + right) / 2 - 10) <= 1 and abs((top + bottom) / 2 - 15) <= 1  # where it was, at half the size
    assert abs(ref.fill_ratio - 21 / 80) < 0.03


# ---- input videos (video-to-4D) ----------------------------------------------------------------------------


def _moving_square(n=5, size=40):
    """Frames of a red square moving right on a white background, [H, W, 3] float."""
    frames = []
    for i in range(n):
        im = np.ones((size, size, 3), np.float32)
        im[15:25, 5 + 4 * i:15 + 4 * i] = [1.0, 0.0, 0.0]
        frames.append(im)
    return frames


@pytest.mark.parametrize("kind", ["folder", "gif", "mp4"])
def test_load_clip_keeps_the_motion(tmp_path, kind):
    from gen3d.export.video import save_image, write_video
    from gen3d.images import load_clip

    frames = _moving_square()
    if kind == "folder":
        path = tmp_path / "frames"
        for i, f in enumerate(frames):
            save_image(path / f"{i:02d}.png", f)
    else:
        path = write_video(tmp_path / f"clip.{kind}", torch.from_numpy(np.stack(frames)), fps=4)
    clip = load_clip(path, 3, size=32, fill_ratio=0.9)
    assert len(clip) == 3
    cols = torch.arange(32.0)
    xs = [(c.mask.sum(0) * cols).sum() / c.mask.sum() for c in clip]  # the square's center column, per frame
    assert xs[0] + 3 < xs[1] < xs[2] - 3  # one crop for all frames: the square still moves right
    assert abs(clip[0].mask.sum() - clip[2].mask.sum()) < 0.2 * clip[0].mask.sum()  # and keeps its size


def test_load_clip_errors(tmp_path):
    from gen3d.export.video import save_image
    from gen3d.images import load_clip

    with pytest.raises(Gen3dError, match="does not exist"):
        load_clip(tmp_path / "nope.mp4", 4)
    (tmp_path / "empty").mkdir()
    with pytest.raises(Gen3dError, match="holds no images"):
        load_clip(tmp_path / "empty", 4)
    for i, f in enumerate(_moving_square(2)):
        save_image(tmp_path / "two" / f"{i}.png", f)
    with pytest.raises(Gen3dError, match="has 2 frame.*frames=4"):
        load_clip(tmp_path / "two", 4)
    (tmp_path / "bad.gif").write_bytes(b"not a gif")
    with pytest.raises(Gen3dError, match="cannot read"):
        load_clip(tmp_path / "bad.gif", 4)

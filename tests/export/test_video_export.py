import imageio.v2 as iio2
import imageio.v3 as iio
import numpy as np
import pytest
import torch

from gen3d.export import video as video_module
from gen3d.export.video import image_grid, save_image, to_uint8, write_video


def frames(T=6, H=34, W=48):
    t = torch.linspace(0, 1, T)[:, None, None, None]
    return (torch.rand(T, H, W, 3, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.5 * t).clamp(0, 1)


def count_mp4_frames(path):
    reader = iio2.get_reader(path, format="FFMPEG")
    try:
        n = sum(1 for _ in reader)
        shape = reader.get_data(0).shape
    finally:
        reader.close()
    return n, shape


def test_mp4_is_written_and_readable(tmp_path):
    written = write_video(tmp_path / "turntable.mp4", frames(T=6), fps=12)
    assert written == tmp_path / "turntable.mp4" and written.stat().st_size > 0
    assert count_mp4_frames(written) == (6, (34, 48, 3))


def test_odd_sizes_uint8_numpy_and_alpha(tmp_path):
    video = (frames(T=3, H=33, W=45).numpy() * 255).astype(np.uint8)
    rgba = np.concatenate([video, np.full((3, 33, 45, 1), 255, np.uint8)], axis=-1)
    written = write_video(tmp_path / "odd.mp4", rgba)
    assert count_mp4_frames(written) == (3, (34, 46, 3))  # padded to even for yuv420p
    with pytest.raises(ValueError, match="T>=1, H, W, 3"):
        write_video(tmp_path / "bad.mp4", np.zeros((3, 8, 8)))


def test_gif_fallback_when_no_encoder(tmp_path, monkeypatch):
    monkeypatch.setattr(video_module, "_ffmpeg_exe", lambda: None)
    with pytest.warns(UserWarning, match="turntable.gif"):
        written = write_video(tmp_path / "turntable.mp4", frames(T=5))
    assert written == tmp_path / "turntable.gif"
    assert not (tmp_path / "turntable.mp4").exists()
    assert iio.imread(written, index=None).shape[:3] == (5, 34, 48)
    direct = write_video(tmp_path / "direct.gif", frames(T=4))
    assert direct.suffix == ".gif" and iio.imread(direct, index=None).shape[0] == 4


def test_save_image_png_round_trip(tmp_path):
    img = (np.arange(4 * 5 * 3) % 256).astype(np.uint8).reshape(4, 5, 3)
    assert np.array_equal(iio.imread(save_image(tmp_path / "a.png", img)), img)
    rgba = torch.rand(6, 7, 4)
    assert np.array_equal(iio.imread(save_image(tmp_path / "b.png", rgba)), to_uint8(rgba))
    gray = torch.rand(6, 7, 1)
    assert iio.imread(save_image(tmp_path / "c.png", gray)).shape == (6, 7)
    with pytest.raises(ValueError, match="image must be"):
        save_image(tmp_path / "d.png", np.zeros((2, 6, 7, 3)))


def test_image_grid_layout():
    images = torch.stack([torch.full((2, 3, 3), i / 10) for i in range(5)])  # [5, 2, 3, 3]
    grid = image_grid(images, nrow=3)
    assert isinstance(grid, torch.Tensor) and grid.shape == (4, 9, 3)
    assert torch.all(grid[0:2, 3:6] == 0.1) and torch.all(grid[2:4, 0:3] == 0.3) and torch.all(grid[2:4, 6:9] == 1.0)
    padded = image_grid(images.numpy(), nrow=2, padding=1, pad_value=0.0)
    assert isinstance(padded, np.ndarray) and padded.shape == (3 * 3 - 1, 2 * 4 - 1, 3)
    assert np.all(padded[2] == 0.0) and np.all(padded[3:5, 4:7] == np.float32(0.3))

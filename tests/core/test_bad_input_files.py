"""Bad input files and unwritable outputs: each is one clear error (a Gen3dError; through the CLI: exit status 2, one
`error:` line, no traceback), and nothing earlier is damaged.

Images are built here with PIL / numpy; checkpoints are a real tiny run's, then truncated or edited; write failures are
real: a subprocess whose file size limit (RLIMIT_FSIZE) is below the file being written (EFBIG, as a full disk gives
ENOSPC), and a folder without write permission (for root, which ignores permissions, the subprocess first drops its
CAP_DAC_OVERRIDE capability)."""

import errno
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gen3d.cli import main
from gen3d.errors import CheckpointError, Gen3dError
from gen3d.images import load_reference
from gen3d.io import atomic_path, write_error
from gen3d.runs import NewerCheckpoint, checkpoint_dirs, latest_checkpoint, load_checkpoint

# ---- images ---------------------------------------------------------------------------------------------------------


def square(size=64, color=(200, 30, 30), background=(255, 255, 255)) -> np.ndarray:
    """uint8 [size, size, 3]: a square of `color` filling the middle half, on `background`."""
    image = np.empty((size, size, 3), np.uint8)
    image[:] = background
    image[size // 4:3 * size // 4, size // 4:3 * size // 4] = color
    return image


def png_16bit(path: Path, pixels: np.ndarray) -> None:
    """Write uint16 [H, W, 3 or 4] as a 16-bit-per-channel PNG (PIL writes 16 bits only for grayscale)."""
    H, W, C = pixels.shape
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)  # filter type 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", W, H, 16, 2 if C == 3 else 6, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))


def truncated(fmt: str):
    def make(path: Path) -> None:
        Image.fromarray(square()).save(path, format=fmt)
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])
    return make


@pytest.mark.parametrize("name, make, message", [
    ("trunc.png", truncated("PNG"), "cannot read .* damaged or not an image"),
    ("trunc.jpg", truncated("JPEG"), "cannot read .* damaged or not an image"),
    ("empty.png", lambda p: p.write_bytes(b""), r"is empty \(0 bytes\)"),
    ("tiny.png", lambda p: Image.new("RGB", (1, 1)).save(p), "is 1x1 pixels; image-to-3D needs at least 16x16"),
    ("text.png", lambda p: p.write_text("just some text\n" * 20), "cannot read .* not an image"),
    ("folder.png", lambda p: p.mkdir(), "is a folder; pass one image file"),
    ("missing.png", lambda p: None, "does not exist; check the path"),
    ("plain.png", lambda p: Image.new("RGB", (64, 64), (90, 90, 200)).save(p), "no foreground found"),
])
def test_bad_images_are_one_clear_error(tmp_path, name, make, message):
    path = tmp_path / name
    make(path)
    with pytest.raises(Gen3dError, match=message) as info:
        load_reference(path, size=32)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize("channels", [3, 4])
def test_16bit_rgb_png_is_scaled_by_its_range(tmp_path, channels):
    image = square().astype(np.uint16) * 257  # full 16-bit range: 200 -> 51400
    if channels == 4:  # transparent outside the square: the mask comes from alpha
        alpha = np.where(square()[..., 1] == 30, 65535, 0).astype(np.uint16)
        image = np.dstack([image, alpha])
    png_16bit(tmp_path / "in.png", image)
    with Image.open(tmp_path / "in.png") as check:
        assert check.info.get("dpi") is None and check.size == (64, 64)  # a real PNG PIL reads
    ref = load_reference(tmp_path / "in.png", size=32, fill_ratio=0.5)
    assert ref.mask_from == ("alpha" if channels == 4 else "background")
    assert np.allclose(ref.rgb[16, 16].numpy(), np.array([200, 30, 30]) / 255, atol=0.01)
    assert 0.2 < float(ref.mask.mean()) < 0.3  # the square fills half of each side


def test_16bit_gray_uses_the_full_range_even_when_dark(tmp_path):
    gray = np.full((64, 64), 60000, np.uint16)  # near white, 16 bits
    gray[16:48, 16:48] = 200  # nearly black in 16 bits (200 / 65535), not 200 / 255
    Image.fromarray(gray).save(tmp_path / "in.png")
    ref = load_reference(tmp_path / "in.png", size=32, fill_ratio=0.5)
    assert float(ref.rgb[16, 16].max()) < 0.01


@pytest.mark.parametrize("mode, suffix", [("CMYK", ".jpg"), ("P", ".png"), ("L", ".png"), ("LA", ".png"),
                                          ("RGBA", ".webp")])
def test_other_modes_work(tmp_path, mode, suffix):
    image = square(color=(30, 30, 30))
    pil = Image.fromarray(image).convert(mode)
    pil.save(tmp_path / f"in{suffix}")
    ref = load_reference(tmp_path / f"in{suffix}", size=32, fill_ratio=0.5)
    assert 0.2 < float(ref.mask.mean()) < 0.3
    assert float(ref.rgb[16, 16].max()) < 0.2 and float(ref.rgb[1, 1].min()) > 0.95  # dark square on white


@pytest.mark.parametrize("suffix", [".gif", ".png"])
def test_animated_image_uses_the_first_frame_and_says_so(tmp_path, suffix):
    first, second = square(color=(200, 30, 30)), square(size=64, color=(30, 30, 200))
    second[:] = 255  # frame 2 is empty: read, it would have no foreground
    frames = [Image.fromarray(first), Image.fromarray(second)]
    frames[0].save(tmp_path / f"clip{suffix}", save_all=True, append_images=frames[1:], duration=100)
    said = []
    ref = load_reference(tmp_path / f"clip{suffix}", size=32, fill_ratio=0.5, warn=said.append)
    assert float(ref.mask.mean()) > 0.2
    assert len(said) == 1 and "animated (2 frames)" in said[0] and "video-to-4d" in said[0]


def test_a_bad_image_through_the_cli_is_one_line_and_leaves_no_run(tmp_path, capsys):
    truncated("PNG")(tmp_path / "object.png")
    out = tmp_path / "outputs"
    assert main(["reconstruct", str(tmp_path / "object.png"), f"output_dir={out}", "progress=false"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: cannot read") and "object.png" in err[-1] and "Traceback" not in "\n".join(err)
    assert not list(out.glob("*/*@*"))  # the run folder made for it is removed


# ---- a real tiny run, then damaged ----------------------------------------------------------------------------------

TINY = ["prompt=a red mug", "max_steps=2", "checkpoint_every=1", "progress=false", "turntable_frames=0",
        "val_every=0", "gaussians.num_points=200", "render_sizes=[16]", "render_size_milestones=[]",
        "cameras.batch_size=1", "cameras.eval_size=16", "exports=[splat-ply]"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A dreamgaussian run of 2 steps on the embedded prior: checkpoints at steps 1 and 2, export/model.ply."""
    out = tmp_path_factory.mktemp("outputs")
    assert main(["run", "dreamgaussian", f"output_dir={out}", *TINY]) == 0
    (run,) = out.glob("dreamgaussian/*@*")
    return run


@pytest.fixture
def run(finished_run, tmp_path):
    """A copy of the finished run, to damage."""
    return Path(shutil.copytree(finished_run, tmp_path / "outputs" / "dreamgaussian" / finished_run.name))


def cli_error(capsys, *argv) -> str:
    """Run the CLI in this process; it must exit with status 2 and one `error:` line, and no traceback."""
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


@pytest.mark.parametrize("damage, message", [
    (lambda c: truncate(c / "model.safetensors"), "model.safetensors cannot be read"),
    (lambda c: truncate(c / "state.pt"), "state.pt cannot be read"),
    (lambda c: (c / "meta.json").unlink(), "it has no meta.json"),
    (lambda c: (c / "meta.json").write_text('{"step": 2, "system": "dreamg'), "meta.json is not valid JSON"),
    (lambda c: (c / "meta.json").write_text('{"system": "dreamgaussian"}'), "meta.json has no integer 'step'"),
])
def test_a_damaged_newest_checkpoint_falls_back_to_the_older_one(run, capsys, damage, message):
    older, newest = checkpoint_dirs(run)
    damage(newest)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(newest)
    warned = []
    assert latest_checkpoint(run, warn=warned.append).step == 1
    assert len(warned) == 1 and message in warned[0] and "trying an older checkpoint" in warned[0]
    damage(older)  # both damaged: resume and export say so, naming both
    for verb in (["resume", str(run)], ["export", str(run), "--format", "splat-ply"]):
        line = cli_error(capsys, *verb)
        assert "no usable checkpoint" in line and "step-000001" in line and "step-000002" in line


def test_a_checkpoint_from_a_newer_gen3d_says_to_upgrade(run, capsys):
    older, newest = checkpoint_dirs(run)
    meta = json.loads((newest / "meta.json").read_text())
    (newest / "meta.json").write_text(json.dumps({**meta, "format": "gen3d-checkpoint-2", "gen3d_version": "9.1.0"}))
    with pytest.raises(NewerCheckpoint, match="written by gen3d 9.1.0 in format gen3d-checkpoint-2.*upgrade gen3d"):
        latest_checkpoint(run, warn=pytest.fail)  # no fallback to the older one: it would overwrite newer progress
    before = digest(run / "checkpoints")
    line = cli_error(capsys, "resume", str(run), "max_steps=4")
    assert "gen3d-checkpoint-2" in line and "upgrade gen3d" in line
    assert digest(run / "checkpoints") == before


def test_checkpoints_record_their_format_and_gen3d_version(finished_run):
    import gen3d

    meta = json.loads((checkpoint_dirs(finished_run)[-1] / "meta.json").read_text())
    assert meta["format"] == "gen3d-checkpoint-1" and meta["gen3d_version"] == gen3d.__version__


def test_a_checkpoint_of_another_system_is_refused(run, capsys):
    for ckpt in checkpoint_dirs(run):
        meta = json.loads((ckpt / "meta.json").read_text())
        (ckpt / "meta.json").write_text(json.dumps({**meta, "system": "dreamfusion"}))
    line = cli_error(capsys, "export", str(run), "--format", "splat-ply")
    assert "belongs to system 'dreamfusion', not 'dreamgaussian'" in line and "start a new run" in line


@pytest.mark.parametrize("damage", [
    lambda p: p.write_bytes(bytes(range(256)) * 4),  # binary garbage
    lambda p: p.write_text("system: dreamgaussian\nmax_steps: [2\n"),  # cut off mid-list
    lambda p: p.write_text(""),  # emptied
])
def test_a_damaged_config_yaml_is_named(run, capsys, damage):
    damage(run / "config.yaml")
    for verb in (["resume", str(run)], ["export", str(run)]):
        line = cli_error(capsys, *verb)
        assert f"the run's config file '{run / 'config.yaml'}' is damaged" in line


# ---- writes that fail: a real file size limit, a real read-only folder -----------------------------------------------


def gen3d_subprocess(*argv, cwd: Path, file_size_limit: int | None = None, read_only: bool = False):
    """`python -m gen3d ...` in a subprocess whose files may not grow past `file_size_limit` bytes (a write past it
    fails with EFBIG; Python ignores SIGXFSZ), or which obeys folder permissions even as root (`read_only`)."""
    import resource

    def limit() -> None:
        if file_size_limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))
        if read_only and os.geteuid() == 0:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH: root then obeys permission bits
                if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP: gone from the exec'd process
                    os._exit(77)

    proc = subprocess.run([sys.executable, "-m", "gen3d", *argv], cwd=cwd, preexec_fn=limit, capture_output=True,
                          text=True, timeout=600)
    if proc.returncode == 77:
        pytest.skip("cannot drop root's permission override here (no CAP_SETPCAP)")
    return proc


def assert_one_error_line(proc) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_a_checkpoint_that_does_not_fit_on_disk_stops_the_run_and_keeps_the_previous_one(run, tmp_path):
    before = digest(run / "checkpoints")
    size = (checkpoint_dirs(run)[-1] / "model.safetensors").stat().st_size
    proc = gen3d_subprocess("resume", str(run), "max_steps=3", cwd=tmp_path, file_size_limit=size // 2)
    line = assert_one_error_line(proc)
    assert "cannot write" in line and str(run / "checkpoints" / "step-000003") in line and "File too large" in line
    assert digest(run / "checkpoints") == before  # steps 1 and 2 untouched, no temporary folder left
    assert latest_checkpoint(run).step == 2


def test_an_export_that_does_not_fit_on_disk_keeps_the_previous_file(run, tmp_path):
    ply = run / "export" / "model.ply"
    before = ply.read_bytes()
    proc = gen3d_subprocess("export", str(run), "--format", "splat-ply", cwd=tmp_path,
                            file_size_limit=ply.stat().st_size // 2)
    line = assert_one_error_line(proc)
    assert f"cannot write '{ply}' (File too large)" in line
    assert ply.read_bytes() == before and sorted(p.name for p in ply.parent.iterdir()) == ["model.ply"]


def test_a_read_only_run_folder_is_one_clear_error(run, tmp_path):
    before = digest(run)
    folders = [run, *(p for p in run.rglob("*") if p.is_dir())]
    for folder in folders:
        folder.chmod(0o555)
    try:
        proc = gen3d_subprocess("resume", str(run), "max_steps=3", cwd=tmp_path, read_only=True)
        line = assert_one_error_line(proc)
        assert f"cannot write '{run / 'config.yaml'}' (Permission denied)" in line and "not writable" in line
        (run / "export").chmod(0o555)
        proc = gen3d_subprocess("export", str(run), "--format", "splat-ply", "--output",
                                str(run / "export" / "model.ply"), cwd=tmp_path, read_only=True)
    finally:
        for folder in folders:
            folder.chmod(0o755)
    line = assert_one_error_line(proc)
    assert f"cannot write '{run / 'export' / 'model.ply'}' (Permission denied)" in line
    after = digest(run)
    after.pop("log.txt", None), before.pop("log.txt", None)  # the export logs that it started
    assert after == before


def test_a_full_disk_is_named_as_such(tmp_path):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    with pytest.raises(OSError) as info:
        with open("/dev/full", "wb") as f:
            f.write(b"x" * 4096)
    assert info.value.errno == errno.ENOSPC
    error = write_error(info.value, tmp_path / "model.ply")
    assert isinstance(error, Gen3dError) and "the disk is full: free space on it" in str(error)
    assert write_error(ValueError("a bug"), tmp_path / "x") is None  # anything else is not a write failure


def test_atomic_path_turns_a_failed_write_into_one_line_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"good")
    with pytest.raises(Gen3dError, match=r"cannot write .*out\.bin.*disk is full"):
        with atomic_path(path) as tmp:
            tmp.write_bytes(b"half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))  # what a full disk raises mid-write
    assert path.read_bytes() == b"good" and [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_an_encoder_failure_falls_back_to_gif_and_keeps_the_existing_mp4(tmp_path, monkeypatch):
    import torch

    from gen3d.export import video

    false = shutil.which("false")
    if false is None:
        pytest.skip("no `false` command here")
    path = video.write_video(tmp_path / "turntable.mp4", torch.rand(4, 16, 16, 3), fps=4)
    before = path.read_bytes()
    monkeypatch.setattr(video, "_ffmpeg_exe", lambda: false)  # an "ffmpeg" that exits with status 1, writing nothing
    with pytest.warns(UserWarning, match="ffmpeg exited with status 1"):
        written = video.write_video(path, torch.rand(4, 16, 16, 3), fps=4)
    assert written.suffix == ".gif" and path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["turntable.gif", "turntable.mp4"]


def test_a_state_pt_that_does_not_fit_keeps_the_previous_checkpoint(tmp_path):
    """torch.save reports a failed write as an opaque RuntimeError; save_checkpoint still names it (here the limit is
    set on this process for the one call: the weights fit, the 400 kB optimizer state does not)."""
    import resource

    import torch

    from gen3d.runs import save_checkpoint

    def save(step):
        return save_checkpoint(tmp_path, step, {"w": torch.ones(3)}, {"adam": torch.zeros(100_000)}, {"system": "s"})

    save(10)
    before = digest(tmp_path / "checkpoints")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))
    try:
        with pytest.raises(Gen3dError, match=r"cannot write '.*step-000020' \(File too large\)"):
            save(20)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert digest(tmp_path / "checkpoints") == before and latest_checkpoint(tmp_path).step == 10


def test_a_full_disk_during_training_stops_with_the_resume_hint(run, capsys):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").symlink_to("/dev/full")  # every write to it: ENOSPC, as on a full disk
    line = cli_error(capsys, "resume", str(run), "max_steps=4")
    assert "metrics.jsonl' (No space left on device)" in line and "the disk is full" in line
    newest = checkpoint_dirs(run)[-1]  # written before the failed metrics line: intact, and named
    assert f"the checkpoint at step {load_checkpoint(newest).step} is intact; resume with: gen3d run" in line

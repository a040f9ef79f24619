"""Property: whatever bytes are given as an input image or video, the reader loads them or raises a Gen3dError (one
line that says what is wrong), never another exception: arbitrary bytes, and valid PNG / JPEG / GIF / WebP / TIFF
files with bytes changed, deleted or inserted (which reach deeper into PIL's decoders than random bytes do)."""

import io
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from gen3d.errors import Gen3dError
from gen3d.images import load_reference, read_video


def _valid_files() -> dict[str, bytes]:
    """Small valid images of the formats users pass: an opaque red square on white, with a transparent border where
    the format has alpha; the GIF and the PNG are animated."""
    image = np.full((24, 24, 4), 255, np.uint8)
    image[6:18, 6:18, :3] = (200, 30, 30)
    image[:2, :, 3] = 0
    rgba = Image.fromarray(image, "RGBA")
    files = {}
    for suffix, fmt, mode, extra in [(".png", "PNG", "RGBA", {}), (".jpg", "JPEG", "RGB", {}),
                                     (".webp", "WEBP", "RGB", {}), (".tif", "TIFF", "RGBA", {}),
                                     (".png", "PNG", "L", {}), (".gif", "GIF", "P", {"save_all": True}),
                                     (".png", "PNG", "RGB", {"save_all": True})]:
        buffer = io.BytesIO()
        frame = rgba.convert(mode)
        if extra:
            extra = {**extra, "append_images": [frame.transpose(Image.Transpose.FLIP_LEFT_RIGHT)], "duration": 100}
        frame.save(buffer, format=fmt, **extra)
        files[f"{fmt}-{mode}{'-animated' if extra else ''}{suffix}"] = buffer.getvalue()
    return files


# PIL warns about some damaged files (a TIFF's "Truncated File Read") before failing on them: noise here
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

VALID = _valid_files()
WORK = Path(tempfile.mkdtemp(prefix="gen3d-fuzz-"))  # one file rewritten per example (no per-example fixture)


def _load(data: bytes, suffix: str) -> None:
    path = WORK / f"input{suffix}"
    path.write_bytes(data)
    try:
        ref = load_reference(path, size=16, warn=lambda message: None)
    except Gen3dError as exc:
        assert "\n" not in str(exc) and str(exc)
    else:
        assert ref.rgb.shape == (16, 16, 3) and bool(ref.rgb.isfinite().all())
        assert float(ref.rgb.min()) >= 0 and float(ref.rgb.max()) <= 1
    try:
        frames = read_video(path)
    except Gen3dError as exc:
        assert "\n" not in str(exc)
    else:
        assert frames and all(f.dtype == np.float32 and f.ndim == 3 and np.isfinite(f).all() for f in frames)


def test_the_seed_files_load():
    for name, data in VALID.items():
        _load(data, Path(name).suffix)
        assert load_reference(WORK / f"input{Path(name).suffix}", size=16, warn=lambda m: None).mask.max() == 1, name


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=4096), suffix=st.sampled_from([".png", ".jpg", ".gif", ".webp", ".bin"]))
def test_arbitrary_bytes_load_or_raise_a_gen3d_error(data, suffix):
    _load(data, suffix)


@st.composite
def mutated(draw):
    """A valid file with 1-8 bytes changed, runs deleted or bytes inserted."""
    name = draw(st.sampled_from(sorted(VALID)))
    data = bytearray(VALID[name])
    for _ in range(draw(st.integers(1, 8))):
        if not data:
            break
        # half of the changes in the first 32 bytes, where the formats keep their sizes and modes
        at = draw(st.one_of(st.integers(0, min(31, len(data) - 1)), st.integers(0, len(data) - 1)))
        kind = draw(st.sampled_from(["set", "delete", "insert"]))
        if kind == "set":
            data[at] = draw(st.integers(0, 255))
        elif kind == "delete":
            del data[at:at + draw(st.integers(1, 64))]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
    return bytes(data), Path(name).suffix


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=mutated())
def test_mutated_valid_images_load_or_raise_a_gen3d_error(case):
    _load(*case)


@pytest.fixture(scope="module", autouse=True)
def _clean_up():
    yield
    import shutil

    shutil.rmtree(WORK, ignore_errors=True)

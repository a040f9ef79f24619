"""SIGINT and SIGTERM sent to real `gen3d` processes at chosen points; the resumed run ends bit for bit like a
straight one.

To hit a point reliably (a checkpoint write takes milliseconds), the run is started through `PAUSE`, which
wraps one real function of gen3d so that its n-th call, once it has run (for the checkpoint folder: once every
file is in the temporary folder, before the rename), writes a marker file and sleeps a few seconds. The test
sends its signal(s) when the marker appears, so they land inside that window. Nothing else is replaced; a
target that is renamed or never called fails the test (no marker) instead of silently not pausing.
"""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gen3d.cli import main
from gen3d.runs import checkpoint_dirs
from tests.systems.conftest import fast_overrides

PAUSE = r'''
import contextlib, importlib, sys, time
from pathlib import Path

target, nth, marker, seconds = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), float(sys.argv[4])
module_name, path = target.split(":")
*owners, name = path.split(".")
owner = importlib.import_module(module_name)
for o in owners:
    owner = getattr(owner, o)
original = getattr(owner, name)
calls = 0

def pause():
    marker.write_text("")
    time.sleep(seconds)  # a handled signal does not cut it short (PEP 475); a raising one does

def counted():
    global calls
    calls += 1
    return calls == nth

if name == "atomic_folder":
    @contextlib.contextmanager
    def wrapper(*args, **kwargs):
        with original(*args, **kwargs) as tmp:
            yield tmp
            if counted():
                pause()  # every file written into the temporary folder, not yet renamed into place
else:
    def wrapper(*args, **kwargs):
        out = original(*args, **kwargs)
        if counted():
            pause()
        return out

setattr(owner, name, wrapper)
from gen3d.cli import main
sys.exit(main(sys.argv[5:]))
'''

STEPS = 8


def run_overrides(prior, out):
    """Every run of these tests: threads=1 (a reduction's float order depends on the thread count), a checkpoint
    every 2 steps, a validation every 3, a 2-frame turntable and two exports, so each point is reached."""
    return ["prompt=a red mug", *fast_overrides(prior, out, steps=STEPS), "threads=1", "val_every=3",
            "turntable_frames=2", "exports=[splat-ply,ply]"]


def final_tensors(run: Path) -> dict[str, torch.Tensor]:
    ckpt = checkpoint_dirs(run)[-1]
    assert ckpt.name == f"step-{STEPS:06d}"
    return load_file(str(ckpt / "model.safetensors"))


@pytest.fixture(scope="module")
def straight(tiny_pixel_prior, tmp_path_factory):
    """The final tensors of an uninterrupted run."""
    out = tmp_path_factory.mktemp("straight")
    assert main(["run", "dreamgaussian", *run_overrides(tiny_pixel_prior, out)]) == 0
    (run,) = out.glob("dreamgaussian/*")
    return final_tensors(run)


def signalled(tmp_path, argv, target, nth, signals):
    """Run `gen3d argv` in a subprocess paused at the `nth` call of `target`, send `signals` there; returns
    (exit status, stderr)."""
    script = tmp_path / "pause.py"
    script.write_text(PAUSE)
    marker = tmp_path / "paused"
    proc = subprocess.Popen([sys.executable, str(script), target, str(nth), str(marker), "3", *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), proc.communicate(timeout=60)
    for i, sig in enumerate(signals):
        if i:
            time.sleep(0.5)  # the first one handled, still inside the pause
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


def assert_status(status: int, sig: int, err: str) -> None:
    # the shell's convention, as `gen3d.cli` returns it: 130 for SIGINT, 143 for SIGTERM (an unhandled one is -15)
    assert status == 128 + sig, (status, err)


# (where, the function paused in, at its n-th call, the signal(s), the step the run stops at)
CASES = {
    "step": ("gen3d.systems.dreamgaussian:DreamGaussian.guide", 5, [signal.SIGTERM], 5),
    # the first signal inside the step-4 write only marks the run (as in "step"); the second abandons the write
    "checkpoint-twice": ("gen3d.runs:atomic_folder", 2, [signal.SIGTERM, signal.SIGTERM], 2),
    "validation": ("gen3d.export.video:save_image", 1, [signal.SIGINT], 3),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_signal_during_training_then_resume_matches_straight_run(case, straight, tiny_pixel_prior, tmp_path):
    target, nth, signals, stopped = CASES[case]
    out = tmp_path / "outputs"
    status, err = signalled(tmp_path, ["run", "dreamgaussian", *run_overrides(tiny_pixel_prior, out)], target, nth,
                            signals)
    assert_status(status, signals[0], err)
    (run,) = out.glob("dreamgaussian/*")
    name = signal.Signals(signals[0]).name
    if len(signals) == 1:
        assert f"interrupted by {name} at step {stopped}; checkpoint saved; resume with: gen3d run {run} --resume" in err
    else:
        assert f"aborted by a second {name} at step 4; the checkpoint at step 2 is intact; resume with: " \
               f"gen3d run {run} --resume" in err
        assert not list((run / "checkpoints").glob(".*")), "the abandoned write left its temporary folder"
    assert [p.name for p in checkpoint_dirs(run)][-1] == f"step-{stopped:06d}"

    assert main(["resume", str(run)]) == 0
    resumed = final_tensors(run)
    assert resumed.keys() == straight.keys()
    for k in straight:
        assert torch.equal(resumed[k], straight[k]), k
    assert (run / "export" / "model.ply").is_file() and (run / "export" / "mesh.ply").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("target, sig", [("gen3d.export.video:write_video", signal.SIGTERM),
                                         ("gen3d.export.ply:save_gaussian_ply", signal.SIGINT)],
                         ids=["turntable", "export"])
def test_signal_while_writing_the_outputs_then_export(target, sig, straight, tiny_pixel_prior, tmp_path):
    out = tmp_path / "outputs"
    status, err = signalled(tmp_path, ["run", "dreamgaussian", *run_overrides(tiny_pixel_prior, out)], target, 1,
                            [sig])
    assert_status(status, sig, err)
    (run,) = out.glob("dreamgaussian/*")
    assert (f"interrupted by {signal.Signals(sig).name} while writing the final outputs; the final checkpoint "
            f"(step {STEPS}) is intact; write the outputs with: gen3d export {run}") in err
    assert not (run / "export" / "mesh.ply").exists()  # the stage after the signal was not started
    finished = final_tensors(run)
    for k in straight:
        assert torch.equal(finished[k], straight[k]), k
    assert main(["resume", str(run)]) == 0  # nothing left to train: it writes the missing outputs
    assert (run / "export" / "model.ply").is_file() and (run / "export" / "mesh.ply").is_file()
    assert list((run / "video").glob("turntable.*"))
    assert torch.equal(final_tensors(run)[next(iter(straight))], straight[next(iter(straight))])
    assert main(["export", str(run)]) == 0  # the way the message names


@pytest.mark.slow
@pytest.mark.parametrize("verb, target, args", [
    ("train-recon", "gen3d.world.trainer:Trainer.train_step",
     ["model=tiny", "objects=2", "views=4", "size=16", "points=256", "batch_size=2", "target_views=2", "warmup=1",
      "backend=torch", "sample_every=0"]),
    ("train-prior", "gen3d.world.train_prior:PriorTrainer.train_step",
     ["batch_size=4", "views_per_object=2", "max_objects=3", "block_out_channels=[8,16,16]", "text_dim=16",
      "sample_every=0", "warmup=2"]),
])
def test_world_trainer_stops_on_sigterm_and_resumes(verb, target, args, tmp_path):
    work = tmp_path / "work"
    argv = ["world", verb, *args, "steps=6", "checkpoint_every=100", "progress=false", "threads=1",
            f"work_dir={work}", f"output={tmp_path / 'model'}"]
    status, err = signalled(tmp_path, argv, target, 2, [signal.SIGTERM])
    assert status == 130, err
    assert f"interrupted at step 2; checkpoint saved; resume with: gen3d world {verb} --resume work_dir={work}" in err
    assert [p.name for p in checkpoint_dirs(work)] == ["step-000002"]
    assert not (tmp_path / "model").exists()
    assert main([*argv, "--resume"]) == 0
    assert [p.name for p in checkpoint_dirs(work)][-1] == "step-000006"
    assert (tmp_path / "model").is_dir()

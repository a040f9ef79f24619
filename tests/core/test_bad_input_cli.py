"""Bad input on the command line, in config files and in prompts: each is one line starting with ``error:`` on
stderr, exit status 2, no traceback, and no run folder left behind."""

import math

import pytest
import yaml

from gen3d.cli import main
from gen3d.config import clean_text
from gen3d.runs import list_runs


def run_cli(argv, capsys):
    """`gen3d argv` in this process: (exit status, stdout, stderr)."""
    try:
        status = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's own errors exit from inside parse_args
        status = exc.code
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_line_error(status, err, fragment):
    assert status == 2, err
    assert "Traceback" not in err
    assert err.startswith("error:") and err.count("\n") == 1, err
    assert fragment in err, err


@pytest.fixture
def files(tmp_path):
    """Broken config files, an image that is not one and a folder that is not a run, by name."""
    made = {
        "garbage.yaml": bytes(range(128, 256)) * 3,
        "tabs.yaml": b"system: dreamgaussian\nguidance:\n\tguidance_scale: 3\n",
        "list.yaml": b"- system\n- dreamgaussian\n",
        "empty.yaml": b"",
        "unknown.yaml": b"system: dreamgaussian\nmax_stepz: 3\n",
        "wrong_type.yaml": b"system: dreamgaussian\nmax_steps: ten\n",
        "nan.yaml": b"system: dreamgaussian\ngaussians:\n  feature_lr: .nan\n",
        "scale_nan.yaml": b"system: dreamgaussian\nguidance:\n  guidance_scale: .nan\n",
        "batch.yaml": b"system: dreamgaussian\ncameras:\n  batch_size: 0\n",
        "no_system.yaml": b"prompt: a red mug\n",
        "not_an_image.png": b"this is not a PNG",
    }
    for name, data in made.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "not_a_run").mkdir()
    return tmp_path


# (argv, a fragment of the one-line message); {tmp} is a folder holding the files of `files`
COMMAND_LINE = [
    # missing required arguments, each verb
    (["run"], "required: config"),
    (["resume"], "required: run"),
    (["view"], "required: target"),
    (["reconstruct"], "required: image"),
    (["sample"], "required: prompt"),
    (["export"], "required: run"),
    (["convert"], "required: run"),
    (["world"], "required: <world-verb>"),
    (["world", "clip"], "required: prompt"),
    # unknown verbs, options and arguments, with a did-you-mean
    (["rn"], "did you mean 'run'?"),
    (["world", "trian-prior"], "did you mean 'train-prior'?"),
    (["run", "dreamgaussian", "--resme"], "did you mean '--resume'?"),
    (["export", "@last", "--formt", "glb"], "did you mean '--format'?"),
    (["configs", "extra"], "gen3d configs: unrecognized argument extra"),
    (["run", "dreamgaussian", "foo"], "override 'foo' is not key=value"),
    (["run", "dreamgusian"], "did you mean 'dreamgaussian'?"),
    (["run", "dreamgaussian", "guidance.guidance_scal=3"], "did you mean 'guidance.guidance_scale'?"),
    (["run", "dreamgaussian", "guidence.guidance_scale=3"], "did you mean 'guidance'?"),
    (["run", "dreamgaussian", "max_step=3"], "did you mean 'max_steps'?"),
    (["world", "train-prior", "stepz=3"], "did you mean 'steps'?"),
    # wrong types
    (["run", "dreamgaussian", "max_steps=abc"], "max_steps: expected an integer, got 'abc'"),
    (["run", "dreamgaussian", "seed=1.5"], "seed: expected an integer"),
    (["run", "dreamgaussian", "exports=glb"], "exports: expected a list"),
    (["view", "@last", "--port", "abc"], "invalid int value: 'abc'"),
    (["view", "x.ply", "--port", "0"], "--port must be in 1..65535"),
    (["sample", "a red mug", "--steps", "abc"], "invalid int value: 'abc'"),
    (["sample", "a red mug", "--steps", "0"], "--steps must be >= 1"),
    (["world", "clip", "a red mug", "--frames", "x"], "invalid int value: 'x'"),
    (["world", "catalog", "--views", "0"], "--views must be in 1..64"),
    (["world", "catalog", "--size", "-5"], "--size in 16..1024"),
    (["world", "train-recon", "--processes", "0"], "--processes must be >= 1"),
    # missing files and folders that are not runs
    (["run", "{tmp}/missing.yaml"], "does not exist"),
    (["run", "{tmp}/not_a_run"], "is a folder but not a run folder"),
    (["resume", "{tmp}/not_a_run"], "is not a run folder"),
    (["export", "{tmp}/not_a_run"], "is not a run folder"),
    (["convert", "{tmp}/not_a_run", "to=gaussians"], "is not a run folder"),
    (["export", "@last", "--output-dir", "{tmp}/not_a_run"], "no runs under"),
    (["view", "{tmp}/missing.ply"], "does not exist"),
    (["view", "{tmp}/not_a_run"], "not a run folder"),
    (["reconstruct", "{tmp}/missing.png", "output_dir={tmp}/out"], "does not exist"),
    (["reconstruct", "{tmp}/not_an_image.png", "output_dir={tmp}/out"], "as an image"),
    (["world", "clip", "a purple zebra"], "names no Shapes-world object"),
    (["world", "clip", "a red mug", "--motion", "dance"], "unknown motion 'dance'"),
    (["convert", "{tmp}/not_a_run", "to=voxels"], "not a representation convert knows"),
    # config files that are not YAML, not a mapping, or hold bad keys and values
    (["run", "{tmp}/garbage.yaml"], "is not text (not UTF-8)"),
    (["run", "{tmp}/tabs.yaml"], "is not valid YAML at line 3"),
    (["run", "{tmp}/list.yaml"], "must be a mapping of keys to values, got list"),
    (["run", "{tmp}/empty.yaml"], "does not say which system to run"),
    (["run", "{tmp}/no_system.yaml"], "add a line `system: dreamgaussian`"),
    (["run", "{tmp}/unknown.yaml"], "did you mean 'max_steps'?"),
    (["run", "{tmp}/wrong_type.yaml"], "max_steps: expected an integer, got 'ten'"),
    (["run", "{tmp}/nan.yaml"], "gaussians.feature_lr must be a finite number, got nan"),
    (["run", "{tmp}/scale_nan.yaml"], "guidance.guidance_scale must be >= 0, got nan"),
    (["run", "{tmp}/batch.yaml"], "cameras.batch_size must be >= 1, got 0"),
]

# (preset or world verb, override, fragment): out-of-range and non-finite values across the systems and trainers
OUT_OF_RANGE = [
    ("dreamgaussian", "max_steps=-1", "max_steps must be >= 1, got -1"),
    ("dreamgaussian", "max_steps=0", "max_steps must be >= 1"),
    ("dreamgaussian", "cameras.batch_size=-2", "cameras.batch_size must be >= 1"),
    ("dreamgaussian", "cameras.eval_size=0", "cameras.eval_size must be >= 1"),
    ("dreamgaussian", "cameras.eval_fovy=180", "cameras.eval_fovy must lie in (0, 180)"),
    ("dreamgaussian", "render_sizes=[0]", "render_sizes must be >= 8"),
    ("dreamgaussian", "gaussians.num_points=0", "gaussians.num_points must be >= 1"),
    ("dreamgaussian", "gaussians.feature_lr=nan", "gaussians.feature_lr must be a finite number, got nan"),
    ("dreamgaussian", "gaussians.position_lr_init=inf", "must be a finite number, got inf"),
    ("dreamgaussian", "texture_refine.lr=-1", "texture_refine.lr must be > 0"),
    ("dreamgaussian", "guidance.guidance_scale=-.inf", "guidance.guidance_scale must be >= 0"),
    ("dreamgaussian", "guidance.guidance_scale=-3", "guidance.guidance_scale must be >= 0"),
    ("dreamgaussian", "lambda_sds=-1", "lambda_sds must be >= 0"),
    ("dreamgaussian", "val_views=0", "val_views must be >= 1"),
    ("dreamgaussian", "turntable_fps=0", "turntable_fps must be >= 1"),
    ("dreamgaussian", "threads=-1", "threads must be >= 0"),
    ("dreamgaussian", "seed=-1", "seed must be >= 0"),
    ("dreamgaussian", "prompt=a\x1b[31m red mug", "control character U+001B"),
    ("dreamfusion", "lr_background=-0.1", "lr_background must be >= 0"),
    ("dreamfusion", "render_size=0", "render_size must be >= 8"),
    ("dreamfusion", "renderer.normals_eps=0", "normals_eps > 0"),
    ("dreamfusion", "hashgrid.lr_encoding=.nan", "must be a finite number"),
    ("prolificdreamer", "guidance.vsd.lora_guidance_scale=-1", "lora_guidance_scale must be >= 0"),
    ("image-to-3d", "fill_ratio=nan", "fill_ratio must be a finite number"),
    ("image-to-3d", "ref_distance=0", "ref_distance must be > 0"),
    ("image-to-3d", "image_size=0", "image_size must be in 16..2048"),
    ("text-to-4d", "frames=0", "frames must be in 2..64"),
    ("text-to-4d", "deformation_lr=-1", "deformation_lr and grid_lr must be > 0"),
    ("text-to-4d", "motion=bo\x00uncing", "motion contains the control character U+0000"),
    ("video-to-4d", "lambda_rigidity=-5", "lambda_rigidity must be >= 0"),
    ("train-prior", "lr=nan", "lr must be a finite number, got nan"),
    ("train-prior", "lr=-1e-3", "lr must be > 0"),
    ("train-prior", "batch_size=0", "batch_size must be >= 1, got 0"),
    ("train-prior", "steps=-5", "steps must be >= 1"),
    ("train-prior", "ema_decay=1", "ema_decay must be in [0, 1)"),
    ("train-view-prior", "patch_size=0", "patch_size must be >= 1"),
    ("train-video-prior", "frames=1", "frames must be >= 2"),
    ("train-recon", "lr=.inf", "lr must be a finite number, got inf"),
    ("train-recon", "batch_size=0", "batch_size must be an integer >= 1"),
    ("distill-flow", "guidance_vm=-1", "guidance_vm must be a finite number >= 0"),
    ("train-flow", "lr=nan", "lr must be a finite number, got nan"),
]


@pytest.mark.parametrize("argv, fragment", COMMAND_LINE, ids=[" ".join(a) for a, _ in COMMAND_LINE])
def test_command_line_errors_are_one_line(argv, fragment, files, capsys, monkeypatch):
    monkeypatch.chdir(files)  # @last looks under ./outputs: an empty folder here
    argv = [a.replace("{tmp}", str(files)) for a in argv]
    if argv[0] == "run" and "--resume" not in argv:
        argv.append("--show-config")  # a config error must stop it before anything is printed
    status, out, err = run_cli(argv, capsys)
    assert_one_line_error(status, err, fragment)
    assert out == ""
    assert list_runs(files / "out") == [] and list_runs(files / "outputs") == []


@pytest.mark.parametrize("where, override, fragment", OUT_OF_RANGE, ids=[f"{w} {o}" for w, o, _ in OUT_OF_RANGE])
def test_out_of_range_values_are_refused(where, override, fragment, capsys):
    verb = ["world", where] if where.startswith(("train-", "distill-")) else ["run", where]
    status, out, err = run_cli([*verb, override, "--show-config"], capsys)
    assert_one_line_error(status, err, fragment)


def test_numbers_in_scientific_notation_are_read(capsys):
    status, out, err = run_cli(["run", "dreamgaussian", "max_steps=1e3", "gaussians.feature_lr=5e-3", "--show-config"],
                               capsys)
    assert status == 0, err
    assert "max_steps = 1000" in out and "gaussians.feature_lr = 0.005" in out


def test_text_fields_keep_the_raw_text(capsys):
    """A prompt is text as typed: a colon, brackets or a '#' do not turn it into YAML."""
    from gen3d.cli import load_run_config

    for prompt in ("mug: red", "[draft] a red mug", "a red mug #2", "yes", "1e3"):
        assert load_run_config("dreamgaussian", [f"prompt={prompt}"])[1].prompt == prompt
    assert load_run_config("dreamgaussian", ['prompt="a red mug"'])[1].prompt == "a red mug"


def test_clean_text():
    assert clean_text("prompt", "a red\r\nmug\tthen") == "a red  mug then"
    assert clean_text("prompt", "一个红色的杯子 🍵 مرحبا\u200f") == "一个红色的杯子 🍵 مرحبا\u200f"
    for bad in ("a\x00b", "a\x1b[31mb", "a\x7fb", "a\x85b"):
        with pytest.raises(ValueError, match="control character"):
            clean_text("prompt", bad)


# ---- real runs of prompts: 2 steps of dreamgaussian on the embedded prior

FAST = ["max_steps=2", "turntable_frames=0", "exports=[]", "progress=false", "val_every=0", "checkpoint_every=0",
        "gaussians.num_points=200", "cameras.batch_size=1", "cameras.eval_size=16", "val_views=1"]

BAD_PROMPTS = [
    ("", "prompt is empty"),
    ("   \t ", "prompt is empty"),
    ("a red\x00 mug", "control character U+0000"),
    ("a red mug\x1b[31m", "control character U+001B"),
]


@pytest.mark.parametrize("prompt, fragment", BAD_PROMPTS, ids=["empty", "whitespace", "nul", "ansi-escape"])
def test_bad_prompts_fail_and_leave_no_run_folder(prompt, fragment, tmp_path, capsys):
    out_dir = tmp_path / "out"
    status, _, err = run_cli(["run", "dreamgaussian", f"prompt={prompt}", f"output_dir={out_dir}", *FAST], capsys)
    assert_one_line_error(status, err, fragment)
    assert not out_dir.exists() or not any((out_dir / "dreamgaussian").glob("*"))  # no half-made run folder


@pytest.mark.parametrize("verb", ["sample"])
@pytest.mark.parametrize("prompt, fragment", [("  ", "the prompt is empty"), ("a\x00b", "control character")],
                         ids=["empty", "nul"])
def test_bad_sample_prompts(verb, prompt, fragment, tmp_path, capsys):
    status, _, err = run_cli([verb, prompt, f"output_dir={tmp_path}"], capsys)
    assert_one_line_error(status, err, fragment)
    assert list(tmp_path.iterdir()) == []


GOOD_PROMPTS = [
    ("a red mug " * 10_000, "a red mug " * 10_000, "a_red_mug_a_red_mug"),  # 100,000 characters
    ("一个红色的杯子 🍵 مرحبا", "一个红色的杯子 🍵 مرحبا", "run"),  # CJK, emoji, right-to-left
    ("a red mug\r\nin two lines", "a red mug  in two lines", "a_red_mug_in_two_lines"),
]


@pytest.mark.parametrize("prompt, stored, slug", GOOD_PROMPTS, ids=["huge", "non-ascii", "line-breaks"])
def test_unusual_prompts_run(prompt, stored, slug, tmp_path, capsys):
    out_dir = tmp_path / "out"
    status, _, err = run_cli(["run", "dreamgaussian", f"prompt={prompt}", f"output_dir={out_dir}", *FAST], capsys)
    assert status == 0, err
    [run] = list_runs(out_dir)
    name = run.name.rsplit("@", 1)[0]
    assert name.startswith(slug) and len(name) <= 48 and name.isascii()
    saved = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    assert saved["prompt"] == stored  # what resume reads back is what ran
    assert (run / "checkpoints" / "step-000002" / "model.safetensors").is_file()


def test_nan_in_a_list_is_refused():
    from gen3d.cli import load_run_config
    from gen3d.errors import ConfigError

    with pytest.raises(ConfigError, match="finite number"):
        load_run_config("dreamgaussian", ["cameras.fovy_range=[.nan, 50]"])
    assert math.isfinite(load_run_config("dreamgaussian", ["cameras.fovy_range=[40, 50]"])[1].cameras.fovy_range[0])

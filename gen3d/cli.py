"""The `gen3d` command.

    gen3d run dreamgaussian prompt="a red mug"        # a preset by name, or configs/x.yaml
    gen3d run @last --resume                          # continue the newest run
    gen3d export @last --format glb splat-ply         # textured mesh + 3DGS PLY (also obj, ply, video)
    gen3d export @last --format obj mesh_faces=20000  # with export settings overridden
    gen3d convert @last to=gaussians steps=500        # distill a run into another representation
    gen3d reconstruct chair.png --mesh                # one image -> 3D Gaussians in one forward pass (TGS)
    gen3d view @last                                  # the result in the browser (also a .ply or .glb)
    gen3d run dreamgaussian prompt="a red mug" --viewer   # watch a run live
    gen3d configs                                     # list the presets
    gen3d run dreamgaussian --show-config             # every key, its value and what it does

A user error prints one line starting with ``error:`` and exits with status 2; Ctrl-C during a
run saves a checkpoint and exits with status 130.
"""

from __future__ import annotations

import argparse
import difflib
import re
import shutil
import sys
from importlib import resources
from pathlib import Path

from gen3d.errors import ConfigError, Gen3dError

EPILOG = "Run `gen3d <verb> --help` for a verb's options. Docs: README.md."


class _Parser(argparse.ArgumentParser):
    """argparse with its errors in the form of every other user error: one line starting with ``error:``, naming the
    verb, with a did-you-mean for a misspelled verb, and where to read more (status 2)."""

    def error(self, message: str):
        choice = re.match(r"argument .*: invalid choice: '([^']*)' \(choose from (.*)\)$", message)
        if choice:
            options = re.findall(r"'([^']*)'", choice.group(2))
            close = difflib.get_close_matches(choice.group(1), options, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            message = f"unknown verb '{choice.group(1)}'; {hint}choose among {', '.join(options)}"
        self.exit(2, f"error: {self.prog}: {message} (see `{self.prog} --help`)\n")


def preset_dir() -> Path:
    """Where the YAML presets live (repo checkout or installed package)."""
    return Path(str(resources.files("gen3d.configs")))


def list_presets() -> dict[str, Path]:
    return {p.stem: p for p in sorted(preset_dir().glob("*.yaml"))}


def resolve_config_path(ref: str) -> Path:
    path = Path(ref)
    if path.is_dir():
        raise ConfigError(f"'{ref}' is a folder but not a run folder (it has no config.yaml); pass a preset name, a "
                          "YAML file, a run folder or @last")
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file '{ref}' does not exist; presets: {', '.join(list_presets())}")
        return path
    presets = list_presets()
    if ref in presets:
        return presets[ref]
    import difflib

    close = difflib.get_close_matches(ref, list(presets), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise ConfigError(f"'{ref}' is neither a config file nor a preset{hint} (presets: {', '.join(presets)})")


def load_run_config(ref: str, overrides: list[str]):
    """Preset/YAML + overrides -> (System class, typed config)."""
    from gen3d.config import apply_overrides, from_dict, read_yaml
    from gen3d.systems import get_system

    run_config = Path(ref) / "config.yaml"  # a run folder carries its resolved config
    data = read_yaml(run_config if run_config.is_file() else resolve_config_path(ref))
    system_cls = get_system(str(_system_name(data, overrides, ref)))
    data = apply_overrides(system_cls.Config, data, overrides)
    return system_cls, from_dict(system_cls.Config, data)


def _system_name(data: dict, overrides: list[str], ref: str) -> str:
    for text in overrides:
        if text.startswith("system="):
            return text.split("=", 1)[1]
    if "system" not in data:
        raise ConfigError(f"config '{ref}' does not say which system to run; add a line `system: dreamgaussian`")
    return data["system"]


def cmd_run(args: argparse.Namespace) -> int:
    from gen3d.config import describe
    from gen3d.runs import new_run_dir, resolve_run
    from gen3d.systems.base import Interrupted, write_config

    if getattr(args, "viewer", False):
        args.overrides = [*args.overrides, "viewer.enabled=true"]
    output_dir = _output_dir(args.overrides)
    if args.config.startswith("@") or args.resume:
        if args.resume:
            run_dir = resolve_run(args.config, output_dir)
            system_cls, cfg = load_run_config(str(run_dir), args.overrides)
        else:  # a new run with an earlier run's config
            system_cls, cfg = load_run_config(str(resolve_run(args.config, output_dir)), args.overrides)
            run_dir = None
    else:
        system_cls, cfg = load_run_config(args.config, args.overrides)
        run_dir = None
    if args.show_config:
        print("\n".join(describe(cfg)))
        return 0
    created = run_dir is None
    if created:
        image = getattr(cfg, "image", "") or getattr(cfg, "video", "")
        name = getattr(cfg, "prompt", "") or (Path(image).stem if image else "") or system_cls.name
        run_dir = new_run_dir(cfg.output_dir, system_cls.name, name)
    write_config(run_dir, cfg)
    try:
        system = system_cls(cfg, run_dir)
        system.ensure_training()  # loads the prior: a missing model stops the run here, at once
        system.log.info(f"run folder: {run_dir}")
        if args.resume:
            system.resume()
            if system.step >= cfg.max_steps and not _missing_outputs(run_dir, cfg):
                system.log.info(f"the run already reached max_steps={cfg.max_steps}; raise it to train longer, e.g. max_steps={cfg.max_steps * 2}")
                return 0
        system.fit()  # at max_steps (stopped while writing its outputs): only the outputs
    except Interrupted as exc:
        print(f"\n{exc}", file=sys.stderr)
        return exc.exit_status
    except Gen3dError:
        if created and not any((run_dir / "checkpoints").glob("step-*")):
            shutil.rmtree(run_dir, ignore_errors=True)  # nothing worth keeping was written
        raise
    return 0


def _missing_outputs(run_dir: Path, cfg) -> list[str]:
    """The end-of-run files (turntable, exports) a finished run should have but does not, e.g. after a signal while
    they were being written."""
    from gen3d.systems.base import default_export_name

    missing = [f"export/{default_export_name(f)}" for f in cfg.exports
               if f != "video" and not (run_dir / "export" / default_export_name(f)).exists()]
    if cfg.turntable_frames and not any((run_dir / "video").glob("turntable.*")):
        missing.append("video/turntable.mp4")
    return missing


def cmd_export(args: argparse.Namespace) -> int:
    from gen3d.runs import resolve_run
    from gen3d.systems.base import default_export_name, export_format

    run_dir = resolve_run(args.run, args.output_dir)
    # `--format glb obj mesh_faces=2000`: --format takes every word after it; key=value words are overrides
    overrides = args.overrides + [f for f in args.format or [] if "=" in f]
    args.format = [f for f in args.format or [] if "=" not in f]
    try:
        args.format = [export_format(f) for f in args.format]
    except ValueError as e:
        raise Gen3dError(str(e)) from None
    if args.output and len(args.format) > 1:
        raise Gen3dError(f"--output names one file but --format asks for {len(args.format)}; drop --output (files go "
                         "to <run>/export/) or export one format at a time")
    system_cls, cfg = load_run_config(str(run_dir), overrides)
    cfg.progress = False
    system = system_cls(cfg, run_dir)
    system.resume(model_only=True)
    formats = args.format or cfg.exports
    if not formats:
        raise Gen3dError(f"the run {run_dir} lists no exports; pass the formats, e.g. --format glb splat-ply")
    for fmt in [export_format(f) for f in formats]:
        out = Path(args.output) if args.output and len(args.format) == 1 else run_dir / "export" / default_export_name(fmt)
        path = system.write_turntable(out) if fmt == "video" else system.export(fmt, out)
        print(path)
    return 0


def _feed_forward_run(system_cls, cfg, kind: str, name: str, make, meta: dict) -> Path:
    """A run folder at step 0 holding a feed-forward result: config, checkpoint (with a fresh training state, so
    `gen3d resume` refines it with the recipe's SDS), exports and turntable. `make(system)` returns the model and
    the seconds it took; the folder is removed when that fails."""
    from gen3d.runs import new_run_dir, save_checkpoint
    from gen3d.systems.base import write_config

    run_dir = new_run_dir(cfg.output_dir, kind, name)
    try:
        write_config(run_dir, cfg)
        system = system_cls(cfg, run_dir)
        system.model, seconds = make(system)
        meta = {"system": system.name, "format": "gen3d-checkpoint-1", "max_steps": cfg.max_steps, **meta,
                "seconds": round(seconds, 4)}
        state = {"training": {}, "generator": system.generator.get_state()}  # SDS refinement starts fresh
        save_checkpoint(run_dir, 0, system.model_tensors(), state, meta, keep=cfg.keep_checkpoints)
        system.finish()
    except Gen3dError:
        shutil.rmtree(run_dir, ignore_errors=True)  # nothing worth keeping was written
        raise
    return run_dir


def _feed_forward_exports(cfg, overrides: list[str], mesh: bool) -> None:
    if not any(o.startswith("exports=") for o in overrides):
        cfg.exports = ["splat-ply"]
    if mesh and "glb" not in cfg.exports:
        cfg.exports = [*cfg.exports, "glb"]


def cmd_reconstruct(args: argparse.Namespace) -> int:
    """`gen3d reconstruct IMAGE`: the feed-forward reconstruction as a run folder (an image-to-3d run at step 0)."""
    system_cls, cfg = load_run_config(args.config, args.overrides)
    if system_cls.name != "zero123":
        raise ConfigError(f"gen3d reconstruct needs an image-to-3d (zero123) config, got system '{system_cls.name}'")
    cfg.image, cfg.init = args.image, "tgs"
    _feed_forward_exports(cfg, args.overrides, args.mesh)

    def make(system):
        model = system.reconstruct()
        return model, system.recon_seconds

    run_dir = _feed_forward_run(system_cls, cfg, "reconstruct", Path(args.image).stem, make,
                                {"reconstructed_by": cfg.recon_model})
    print(run_dir)
    print(f"refine it with Zero123 SDS: gen3d resume {run_dir}", file=sys.stderr)
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    """`gen3d sample PROMPT [--steps N]`: the few-step generator's sample as a run folder (a dreamgaussian run at
    step 0)."""
    from gen3d.config import clean_text

    system_cls, cfg = load_run_config(args.config, args.overrides)
    if system_cls.name != "dreamgaussian":
        raise ConfigError(f"gen3d sample needs a dreamgaussian (text-to-3D Gaussians) config, got system "
                          f"'{system_cls.name}'")
    if args.steps is not None and args.steps < 1:
        raise Gen3dError(f"--steps must be >= 1, got {args.steps}")
    try:
        cfg.prompt, cfg.init = clean_text("the prompt", args.prompt), "flow"
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if not cfg.prompt.strip():
        raise ConfigError('the prompt is empty; say what to generate, e.g. gen3d sample "a red mug"')
    if args.steps is not None:
        cfg.flow_steps = args.steps
    _feed_forward_exports(cfg, args.overrides, args.mesh)

    def make(system):
        model = system.generate()
        return model, system.generate_seconds

    run_dir = _feed_forward_run(system_cls, cfg, "sample", args.prompt, make,
                                {"generated_by": cfg.flow_model, "flow_steps": cfg.flow_steps})
    print(run_dir)
    print(f"refine it with SDS: gen3d resume {run_dir}", file=sys.stderr)
    return 0


def cmd_view(args: argparse.Namespace) -> int:
    """`gen3d view TARGET`: serve the result until Ctrl-C."""
    import time

    if not 1 <= args.port <= 65535:
        raise Gen3dError(f"--port must be in 1..65535, got {args.port}")
    from gen3d.viewer.snapshots import snapshot_of

    snapshot, title, description = snapshot_of(args.target, args.output_dir)
    from gen3d.viewer.server import Viewer

    viewer = Viewer(host=args.host, port=args.port, title=title, description=description, exports=False,
                    log=lambda line: print(line, file=sys.stderr))
    viewer.publish(snapshot)
    video = snapshot.info.get("turntable")
    if video:
        import imageio.v3 as iio
        import numpy as np

        frames = np.stack([np.asarray(f)[..., :3] for f in iio.imiter(video)])
        viewer.show_video(frames)
    print(f"viewer: {viewer.url}  (Ctrl-C to close)", flush=True)
    try:
        while True:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        viewer.close()
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """`gen3d convert RUN to=... [steps=N] [convert.key=value] [target key=value]`."""
    from gen3d.config import apply_overrides, from_dict
    from gen3d.runs import resolve_run
    from gen3d.systems.convert import ConvertConfig, check_target, convert_run, report_line

    to, steps, settings, target = None, "500", [], []
    for text in args.overrides:
        key, _, value = text.partition("=")
        if key == "to":
            to = value
        elif key == "steps":
            steps = value
        elif key.startswith("convert."):
            settings.append(text.removeprefix("convert."))
        else:
            target.append(text)
    if to is None:
        raise Gen3dError("say what to convert to: to=hashgrid, to=triplane or to=gaussians")
    check_target(to)
    if not steps.strip().isdigit():
        raise Gen3dError(f"steps must be a whole number >= 0, got steps={steps}")
    try:
        cfg = from_dict(ConvertConfig, apply_overrides(ConvertConfig, {}, settings))
    except ConfigError as exc:
        raise ConfigError(f"convert.*: {exc}") from None
    run_dir, report = convert_run(resolve_run(args.run, args.output_dir), to, int(steps), target, cfg)
    print(run_dir)
    print(report_line(report))
    return 0


def cmd_world_train(args: argparse.Namespace) -> int:
    """`gen3d world train-*` / `distill-flow`: one trainer, configured by overrides, resumable."""
    from gen3d.config import apply_overrides, describe, from_dict

    processes = getattr(args, "processes", 1)
    if processes < 1:
        raise Gen3dError(f"--processes must be >= 1, got {processes}")
    module, config_name, trainer_name = args.trainer
    config_cls, trainer_cls = _lazy(module, config_name), _lazy(module, trainer_name)
    cfg = from_dict(config_cls, apply_overrides(config_cls, {}, args.overrides))
    if args.show_config:
        print("\n".join(describe(cfg)))
        return 0
    if processes > 1:  # data-parallel: every process runs the trainer, rank 0 writes
        from gen3d.world.trainer import run_distributed

        try:
            run_distributed(trainer_cls, cfg, processes, resume=args.resume)
        except KeyboardInterrupt:
            return 130
        print(Path(cfg.output))
        return 0
    trainer = trainer_cls(cfg)
    if args.resume and trainer.resume():
        print(f"resumed at step {trainer.step} from {cfg.work_dir}", file=sys.stderr)
    try:
        out = trainer.fit()
    except KeyboardInterrupt:
        return 130
    print(out)
    return 0


def cmd_world_clip(args: argparse.Namespace) -> int:
    from gen3d.world.animation import MOTIONS, AnimatedObject, save_clip
    from gen3d.world.catalog import parse_prompt

    obj = parse_prompt(args.prompt)
    if obj is None:
        raise Gen3dError(f"'{args.prompt}' names no Shapes-world object; try \"a red mug\" (gen3d world catalog "
                         "draws the shapes)")
    if args.motion not in MOTIONS:
        raise Gen3dError(f"unknown motion '{args.motion}'; choose among {', '.join(MOTIONS)}")
    if not 2 <= args.frames <= 256 or not 16 <= args.size <= 1024:
        raise Gen3dError(f"--frames must be in 2..256 and --size in 16..1024, got {args.frames} and {args.size}")
    print(save_clip(AnimatedObject(obj, args.motion), args.output, frames=args.frames, size=args.size))
    return 0


def cmd_world_catalog(args: argparse.Namespace) -> int:
    from gen3d.cameras import orbit_cameras
    from gen3d.export.video import save_image
    from gen3d.world.catalog import COLORS, SHAPES, WorldObject
    from gen3d.world.render import contact_sheet

    if not 1 <= args.views <= 64 or not 16 <= args.size <= 1024:
        raise Gen3dError(f"--views must be in 1..64 and --size in 16..1024, got {args.views} and {args.size}")
    colors = list(COLORS)
    objects = [WorldObject(shape, colors[i % len(colors)]) for i, shape in enumerate(SHAPES)]
    sheet = contact_sheet(objects, orbit_cameras(args.views, elevation=20.0, distance=2.3, width=args.size, height=args.size))
    print(save_image(args.output, sheet))
    return 0


def cmd_configs(args: argparse.Namespace) -> int:
    from gen3d.config import read_yaml

    for name, path in list_presets().items():
        data = read_yaml(path)
        print(f"{name:20s} system={data.get('system', '?'):15s} {path}")
    return 0


def _lazy(module: str, name: str):
    import importlib

    return getattr(importlib.import_module(module), name)


def _output_dir(overrides: list[str]) -> str:
    for text in overrides:
        if text.startswith("output_dir="):
            return text.split("=", 1)[1]
    return "outputs"


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; `verb` (the command line's first word) lets verbs whose help needs heavy imports
    build it only when they are asked for (`gen3d --help` stays fast)."""
    from gen3d import __version__

    parser = _Parser(
        prog="gen3d", description="Text or one image to 3D: score distillation, exports, viewer.", epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"gen3d {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="<verb>")

    run = sub.add_parser("run", help="run a recipe (or resume one with --resume)", description=(
        "Run an optimization recipe. CONFIG is a preset name (see `gen3d configs`), a YAML file, a run "
        "folder or @last. Overrides are dotted key=value pairs, e.g. prompt=\"a red mug\" max_steps=200 "
        "guidance.guidance_scale=50; --show-config lists every key."))
    run.add_argument("config", help="preset name, YAML file, run folder, or @last")
    run.add_argument("overrides", nargs="*", default=[], help="dotted key=value overrides")
    run.add_argument("--resume", action="store_true", help="continue the run folder CONFIG (or @last) from its newest checkpoint")
    run.add_argument("--show-config", action="store_true", help="print the resolved config with each key's meaning and exit")
    run.add_argument("--viewer", action="store_true", help="watch the run in the browser (= viewer.enabled=true; "
                     "viewer.host, viewer.port, viewer.keep_open=true)")
    run.set_defaults(func=cmd_run)

    resume = sub.add_parser("resume", help="continue a run from its newest checkpoint (= run RUN --resume)")
    resume.add_argument("config", metavar="run", help="run folder or @last")
    resume.add_argument("overrides", nargs="*", default=[], help="dotted key=value overrides, e.g. max_steps=1000")
    resume.add_argument("--viewer", action="store_true", help="watch the run in the browser")
    resume.set_defaults(func=cmd_run, resume=True, show_config=False)

    view = sub.add_parser("view", help="open a run's result, a 3DGS .ply or a mesh (.glb/.obj/.ply) in the browser")
    view.add_argument("target", help="run folder, @last, a Gaussian .ply, or a mesh file")
    view.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1: this machine only)")
    view.add_argument("--port", type=int, default=8080, help="first port to try (the next free one is taken)")
    view.add_argument("--output-dir", default="outputs", help="where @last looks for runs")
    view.set_defaults(func=cmd_view)

    recon = sub.add_parser(
        "reconstruct", help="one image -> 3D Gaussians in one forward pass (TGS), with PLY, turntable and optional mesh",
        description="Reconstruct 3D Gaussians from one image with the feed-forward triplane-Gaussian model (TGS) and "
        "write a run folder: reference.png, export/model.ply (3DGS), video/turntable.mp4 and, with --mesh, "
        "export/mesh.glb. The input camera is the image-to-3d one (elevation=, ref_distance=, ref_fovy=). The folder "
        "is an image-to-3d run at step 0: `gen3d resume RUN` refines it with Zero123 SDS, `gen3d export RUN` and "
        "`gen3d view RUN` work on it.")
    recon.add_argument("image", help="RGBA image, or RGB on a plain background")
    recon.add_argument("overrides", nargs="*", default=[], metavar="key=value",
                       help="image-to-3d settings, e.g. elevation=15 recon_model=FOLDER exports=[splat-ply,obj]")
    recon.add_argument("--mesh", action="store_true", help="also write a textured mesh (export/mesh.glb)")
    recon.add_argument("--config", default="image-to-3d", help="image-to-3d preset or YAML the settings start from")
    recon.set_defaults(func=cmd_reconstruct)

    sample = sub.add_parser(
        "sample", help="text -> 3D Gaussians in 1-2 network calls (the distilled flow generator), with PLY, turntable "
        "and optional mesh",
        description="Generate 3D Gaussians for a prompt with the few-step flow generator (embedded: gen3d/shapes-flow, "
        "distilled by MDT-dist, 1 step) and write a run folder: export/model.ply (3DGS), video/turntable.mp4 and, "
        "with --mesh, export/mesh.glb. The folder is a dreamgaussian run at step 0: `gen3d resume RUN` refines it "
        "with SDS, `gen3d export RUN` and `gen3d view RUN` work on it. seed=N draws another sample; "
        "flow_model=gen3d/shapes-flow-teacher samples the 25-step teacher.")
    sample.add_argument("prompt", help='what to generate, e.g. "a red mug"')
    sample.add_argument("overrides", nargs="*", default=[], metavar="key=value",
                        help="dreamgaussian settings, e.g. seed=3 flow_model=FOLDER flow_points=2048 exports=[obj]")
    sample.add_argument("--steps", type=int, default=None,
                        help="sampling steps (default: the generator's own, 1 for gen3d/shapes-flow)")
    sample.add_argument("--mesh", action="store_true", help="also write a textured mesh (export/mesh.glb)")
    sample.add_argument("--config", default="dreamgaussian", help="dreamgaussian preset or YAML the settings start from")
    sample.set_defaults(func=cmd_sample)

    export = sub.add_parser("export", help="write a run's result as GLB / OBJ / PLY mesh, 3DGS PLY or video")
    export.add_argument("run", help="run folder or @last")
    export.add_argument("overrides", nargs="*", default=[], metavar="key=value",
                        help="export settings, e.g. mesh_faces=20000 texture_size=512 mesh_threshold=auto")
    export.add_argument("--format", nargs="+", metavar="FORMAT",
                        help="glb / obj: textured mesh; ply: vertex-colored mesh; splat-ply: standard 3DGS PLY; "
                             "video: turntable (default: the run's exports)")
    export.add_argument("--output", help="output file (default: <run>/export/<name>)")
    export.add_argument("--output-dir", default="outputs", help="where @last looks for runs")
    export.set_defaults(func=cmd_export)

    convert = sub.add_parser(
        "convert", help="distill a run into another representation (hash grid, triplane, 3D Gaussians)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_convert_help() if verb == "convert" else "Distill a run into another representation.")
    convert.add_argument("run", help="run folder or @last (a dreamfusion or dreamgaussian run with a checkpoint)")
    convert.add_argument("overrides", nargs="*", default=[], metavar="key=value",
                         help="to=hashgrid|triplane|gaussians (required), steps=N (default 500), convert.<key>=... "
                              "for the distillation, anything else for the new run's config")
    convert.add_argument("--output-dir", default="outputs", help="where @last looks for runs")
    convert.set_defaults(func=cmd_convert)

    world = sub.add_parser("world", help="the embedded Shapes world: catalog pictures, prior training")
    wsub = world.add_subparsers(dest="world_verb", metavar="<world-verb>", required=True)
    trainers = {
        "train-prior": ("gen3d.world.train_prior", "PriorTrainConfig", "PriorTrainer",
                        "train the embedded text-to-image prior (reproduces the shipped weights)"),
        "train-view-prior": ("gen3d.world.train_view_prior", "ViewPriorTrainConfig", "ViewPriorTrainer",
                             "train the embedded Zero123-style view-conditioned prior"),
        "train-video-prior": ("gen3d.world.train_video_prior", "VideoPriorTrainConfig", "VideoPriorTrainer",
                              "train the embedded text-to-video prior (4D guidance)"),
        "train-recon": ("gen3d.world.train_recon", "ReconTrainConfig", "ReconTrainer",
                        "train the feed-forward triplane-Gaussian reconstructor (TGS)"),
        "train-flow": ("gen3d.world.train_flow", "FlowTrainConfig", "FlowTrainer",
                       "train the text-to-point-set flow teacher of the few-step generator"),
        "distill-flow": ("gen3d.world.train_flow", "DistillConfig", "DistillTrainer",
                         "distill the flow teacher into a 1-2-step student (MDT-dist, or the consistency baseline)"),
    }
    for verb, (module, config_name, trainer_name, text) in trainers.items():
        train = wsub.add_parser(verb, help=text, description=f"{text[0].upper()}{text[1:]}, from a seed; overrides "
                                "such as steps=200 output=/tmp/prior; --show-config lists them.")
        train.add_argument("overrides", nargs="*", default=[], help="dotted key=value overrides")
        train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in work_dir")
        train.add_argument("--show-config", action="store_true", help="print every setting with its meaning and exit")
        if verb not in ("train-prior", "train-view-prior", "train-video-prior"):
            train.add_argument("--processes", type=int, default=1,
                               help="data-parallel CPU processes (torch.distributed, gloo); or launch with torchrun")
        train.set_defaults(func=cmd_world_train, trainer=(module, config_name, trainer_name))
    catalog = wsub.add_parser("catalog", help="render every shape of the world into one picture")
    catalog.add_argument("--output", default="shapes_catalog.png", help="PNG to write")
    catalog.add_argument("--views", type=int, default=4, help="views per shape")
    catalog.add_argument("--size", type=int, default=96, help="pixels per view")
    catalog.set_defaults(func=cmd_world_catalog)

    clip = wsub.add_parser("clip", help="render an animated object as an input video for video-to-4D",
                           description="Render a Shapes-world object under a known motion from the video-to-4d "
                                       "preset's input camera, e.g. `gen3d world clip \"a red mug\" --motion bounce`.")
    clip.add_argument("prompt", help='the object, e.g. "a red mug" (gen3d world catalog shows the shapes)')
    clip.add_argument("--motion", default="bounce", help="spin, bounce, grow or swing (default bounce)")
    clip.add_argument("--frames", type=int, default=8, help="frames (default 8)")
    clip.add_argument("--size", type=int, default=128, help="pixels per side (default 128)")
    clip.add_argument("--output", default="clip.gif",
                      help="a .gif / .mp4 over white, or a folder (no suffix) of RGBA frame_000.png ... (default clip.gif)")
    clip.set_defaults(func=cmd_world_clip)

    configs = sub.add_parser("configs", help="list the config presets")
    configs.set_defaults(func=cmd_configs)
    parser.verb_parsers = {**sub.choices, **{f"world {name}": p for name, p in wsub.choices.items()}}
    return parser


def _unrecognized(parser: argparse.ArgumentParser, args: argparse.Namespace, stray: list[str]) -> None:
    """Fail on arguments no verb takes, in the verb's name, suggesting the option that was probably meant."""
    verb = " ".join(v for v in (getattr(args, "verb", None), getattr(args, "world_verb", None)) if v)
    verb_parser = parser.verb_parsers.get(verb, parser)
    options = set(re.findall(r"--[\w-]+", verb_parser.format_usage())) - {"--help"}
    close = difflib.get_close_matches(stray[0].split("=")[0], sorted(options), n=1) if stray[0].startswith("-") else []
    hint = f"; did you mean '{close[0]}'?" if close else ""
    verb_parser.error(f"unrecognized argument{'s' * (len(stray) > 1)} {' '.join(stray)}{hint}")


def _convert_help() -> str:
    from gen3d.config import describe
    from gen3d.systems.convert import ConvertConfig

    settings = "\n".join(f"  convert.{line}" for line in describe(ConvertConfig()))
    return (
        "Distill a trained run into another representation (Progressive Volume Distillation, Fang et al. 2023):\n"
        "  to=hashgrid | to=triplane   a new dreamfusion run with that field\n"
        "  to=gaussians                a new dreamgaussian run\n"
        "The new field matches the source's per-step opacity and albedo at random points and its renders from random\n"
        "cameras of the source's orbit; Gaussians start on the source's surface and are fitted to its renders. The new\n"
        "run folder (printed; under the source's output_dir unless output_dir=... is given) holds a checkpoint at\n"
        "step 0 and convert.json: the PSNR of its renders against the source's on a held-out orbit, at\n"
        "initialization and after distillation. Then `gen3d export NEW`, or `gen3d run NEW --resume` to continue\n"
        "with SDS.\n\n"
        "Examples:\n"
        "  gen3d convert @last to=triplane\n"
        "  gen3d convert outputs/dreamfusion/a_red_mug@... to=gaussians steps=300 gaussians.num_points=4000\n\n"
        f"Distillation settings (convert.<key>=value):\n{settings}\n"
        "Other key=value pairs override the new run's config (list its keys with `gen3d run dreamfusion --show-config`)."
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv[0] if argv else None)
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after options (gen3d run @last --resume max_steps=900)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        _unrecognized(parser, args, stray)
    if extra:
        args.overrides = [*args.overrides, *extra]
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except Gen3dError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\naborted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

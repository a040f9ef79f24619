"""Where the time of the default text-to-3D run goes: setup, render, prior, optimizer, densification, I/O.

    python benchmarks/profile_run.py                      # `gen3d run dreamgaussian prompt="a red mug"`, profiled
    python benchmarks/profile_run.py --compare            # the torch and cpp rasterizers, each in a fresh process
    python benchmarks/profile_run.py --max-steps 100 --backend torch
    python benchmarks/profile_run.py --quick              # 6 steps at 32^2: a smoke test

The run is built as the CLI builds it (`load_run_config("dreamgaussian", ["prompt=a red mug"])`, a
new run folder, its config.yaml, the system, `ensure_training`, `fit`), in a temporary output folder
unless --output-dir is given. Nothing in gen3d is changed: for the duration of the script only,
the calls of each phase are wrapped with wall-clock timers (time.perf_counter):

- module attributes of `gen3d.systems.dreamgaussian`: `render_gaussians` (counted as the training
  render inside `training_step`, else as an evaluation render) and `sample_orbit`;
- attributes of the system's instances: `training_step`, `background_for`, `prompts`, `guidance`,
  `prior.encode`, `prior.unet_eps`, `model.update_learning_rate`, `optimizer.step` and `zero_grad`,
  `strategy.update_stats` and `maybe_densify`, `validate`, `save`, `write_turntable`, `export`;
- `torch.Tensor.backward`, during training steps only.

The render's backward runs inside `loss.backward()`. The training render's outputs pass through an
identity autograd function whose backward notes the moment autograd reaches them; on CPU, autograd
runs the graph on the calling thread in dependency order, so `loss.backward()` splits exactly there:
before it, the guidance's backward (the SDS surrogate loss and the resize to the prior's input;
the prior's UNet runs under no_grad and has none); after it, the render's backward (rasterizer,
projection, SH colors, gradient accumulation into the Gaussians), since every node left in the
graph then belongs to the render. The marker costs microseconds. This is more honest than
torch.profiler's self-CPU totals, which split a custom autograd Function's C++ work from its
Python and add their own overhead to every op of a run made of many small ops.

Setup is reported apart from the steps: imports (torch and gen3d, when this process has not
imported them yet), the config and run folder, the Gaussians' initialization, the prior and
prompts (`ensure_training`), and loading the C++ rasterizer, which the CLI would do inside the
first render: `cpp_cache_cold` says whether it had to be compiled. `total_s` runs from the start of
`main` to the end of `fit`; `before_main_s` is the interpreter's start before it (when the process
ran this script), and --compare adds each child's `process_wall_s`, start to exit, which also holds
the interpreter's shutdown. `unattributed_s` is the total less the measured phases (the fit
loop's bookkeeping: progress bar, metrics.jsonl, logging).

Prints one JSON object; with --compare, one per backend under `runs` and their ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

QUICK_OVERRIDES = [
    "max_steps=6", "render_sizes=[32]", "cameras.batch_size=2", "cameras.eval_size=32", "gaussians.num_points=500",
    "val_every=3", "checkpoint_every=3", "turntable_frames=4", "densify.densify_from=2", "densify.densify_every=2",
]
STEP_PHASES = ["lr_schedule", "cameras", "render_forward", "prompts", "prior_forward", "guidance_backward",
               "render_backward", "densify_stats", "optimizer", "densify"]
SETUP_PHASES = ["imports", "config", "model_init", "prior_setup", "cpp_build"]
IO_PHASES = ["validation", "checkpoints", "turntable", "exports"]
GROUPS = {
    "setup": SETUP_PHASES,
    "render": ["render_forward", "render_backward"],
    "prior": ["prompts", "prior_forward", "guidance_backward"],
    "optimizer": ["lr_schedule", "optimizer"],
    "densification": ["densify_stats", "densify"],
    "io": IO_PHASES,
    "cameras": ["cameras"],
}
TARGETS = {"renderer_fraction_of_step_below": 0.25, "total_s_below": 120.0}


class Timers:
    """Wall-clock totals and call counts by phase name."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.step_times: list[float] = []
        self.in_step = False
        self.render_reached: float | None = None  # when the backward reached the training render's outputs

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] += seconds
        self.calls[name] += 1

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def wrap(self, fn, name: str):
        def timed(*args, **kwargs):
            with self.phase(name):
                return fn(*args, **kwargs)
        return timed


def _backward_marker(timers: Timers):
    """An identity autograd function whose backward notes when the gradient reaches it."""
    import torch

    class Mark(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, grad):
            if timers.render_reached is None:
                timers.render_reached = time.perf_counter()
            return grad

    return Mark.apply


@contextmanager
def instrumented(system, timers: Timers):
    """Wrap the calls of every phase of `system` (see the module docstring); undone on exit."""
    import torch

    import gen3d.systems.dreamgaussian as dg

    mark = _backward_marker(timers)
    render, sample_orbit, backward = dg.render_gaussians, dg.sample_orbit, torch.Tensor.backward

    def timed_render(*args, **kwargs):
        with timers.phase("render_forward" if timers.in_step else "eval_render"):
            out = render(*args, **kwargs)
        if timers.in_step and out.rgb.requires_grad:
            out = dataclasses.replace(out, rgb=mark(out.rgb), alpha=mark(out.alpha), depth=mark(out.depth))
        return out

    def timed_backward(tensor, *args, **kwargs):
        if not timers.in_step:
            return backward(tensor, *args, **kwargs)
        timers.render_reached = None
        start = time.perf_counter()
        result = backward(tensor, *args, **kwargs)
        end = time.perf_counter()
        split = timers.render_reached or end  # never reached: all of it was the guidance's
        timers.add("guidance_backward", split - start)
        timers.add("render_backward", end - split)
        return result

    step = system.training_step

    def timed_step(*args, **kwargs):
        timers.in_step = True
        start = time.perf_counter()
        try:
            return step(*args, **kwargs)
        finally:
            timers.in_step = False
            timers.step_times.append(time.perf_counter() - start)

    wrapped = {
        system: {"training_step": timed_step, "background_for": timers.wrap(system.background_for, "cameras"),
                 "prompts": timers.wrap(system.prompts, "prompts"),
                 "validate": timers.wrap(system.validate, "validation"),
                 "save": timers.wrap(system.save, "checkpoints"),
                 "write_turntable": timers.wrap(system.write_turntable, "turntable")},
        system.guidance: {"guide": timers.wrap(system.guidance.guide, "prior_forward")},
        system.prior: {"encode": timers.wrap(system.prior.encode, "prior_encode"),
                       "unet_eps": timers.wrap(system.prior.unet_eps, "prior_unet")},
        system.model: {"update_learning_rate": timers.wrap(system.model.update_learning_rate, "lr_schedule")},
        system.optimizer: {"step": timers.wrap(system.optimizer.step, "optimizer"),
                           "zero_grad": timers.wrap(system.optimizer.zero_grad, "optimizer")},
        system.strategy: {"update_stats": timers.wrap(system.strategy.update_stats, "densify_stats"),
                          "maybe_densify": timers.wrap(system.strategy.maybe_densify, "densify")},
    }
    export = system.export

    def timed_export(fmt, path):
        with timers.phase("exports"), timers.phase(f"export_{fmt}"):
            return export(fmt, path)

    wrapped[system]["export"] = timed_export
    dg.render_gaussians, dg.sample_orbit = timed_render, timers.wrap(sample_orbit, "cameras")
    torch.Tensor.backward = timed_backward
    missing = object()
    saved = [(obj, name, obj.__dict__.get(name, missing)) for obj, attrs in wrapped.items() for name in attrs]
    for obj, attrs in wrapped.items():
        obj.__dict__.update(attrs)  # instance attributes shadow the methods (and nn.Module's __setattr__)
    try:
        yield
    finally:
        dg.render_gaussians, dg.sample_orbit, torch.Tensor.backward = render, sample_orbit, backward
        for obj, name, value in saved:
            if value is missing:
                del obj.__dict__[name]
            else:
                obj.__dict__[name] = value


def profile(args, start: float) -> dict:
    """One profiled run; `start` is the perf_counter at which the script's work began."""
    timers = Timers()
    with timers.phase("imports"):
        import torch

        from gen3d.cli import load_run_config
        from gen3d.ops import _raster_cpp
        from gen3d.ops.rasterize import _choose_backend
        from gen3d.runs import new_run_dir
        from gen3d.systems.base import write_config
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    overrides = [f"prompt={args.prompt}", f"output_dir={args.output_dir}", f"rasterizer={args.backend}",
                 *(QUICK_OVERRIDES if args.quick else []),
                 *([f"max_steps={args.max_steps}"] if args.max_steps else []), *args.override]
    with timers.phase("config"):
        system_cls, cfg = load_run_config("dreamgaussian", overrides)
        run_dir = new_run_dir(cfg.output_dir, system_cls.name, cfg.prompt)
        write_config(run_dir, cfg)
    # What `rasterizer=auto` would build inside the first render, measured apart.
    cold = None
    with timers.phase("cpp_build"):
        if cfg.rasterizer in ("auto", "cpp") and cfg.device in ("auto", "cpu") and not torch.cuda.is_available():
            so_dir = _raster_cpp.cache_dir() / _raster_cpp._extension_name()
            cold = not any(so_dir.glob("*.so"))
            _raster_cpp.load_extension()
    with timers.phase("model_init"):
        system = system_cls(cfg, run_dir)
    with timers.phase("prior_setup"):
        system.ensure_training()
    backend_used = _choose_backend(cfg.rasterizer, system.model.means)
    n_start = system.model.num_gaussians
    with instrumented(system, timers):
        system.fit()
    total = time.perf_counter() - start
    threads = torch.get_num_threads()
    torch.set_num_threads(previous_threads)
    return report(args, cfg, timers, total, backend_used, cold, n_start, system, run_dir, threads)


def report(args, cfg, timers: Timers, total: float, backend_used: str, cold, n_start: int, system, run_dir,
           threads: int) -> dict:
    import torch

    sec = timers.seconds
    phases = {name: sec.get(name, 0.0) for name in SETUP_PHASES + STEP_PHASES + IO_PHASES}
    steps_s = sum(timers.step_times)
    measured = sum(phases.values())
    step_measured = sum(phases[name] for name in STEP_PHASES)
    renderer = phases["render_forward"] + phases["render_backward"]
    times = timers.step_times
    groups = {group: sum(phases[name] for name in names) for group, names in GROUPS.items()}
    return {
        "benchmark": "profile of the default text-to-3D run (dreamgaussian, embedded prior), CPU",
        "command": f'gen3d run dreamgaussian prompt="{args.prompt}"',
        "overrides": (QUICK_OVERRIDES if args.quick else []) + args.override,
        "backend": cfg.rasterizer, "backend_used": backend_used, "cpp_cache_cold": cold,
        "threads": threads, "torch": torch.__version__,
        "load_average_at_start": args.load_average,
        "steps": len(times), "render_sizes": cfg.render_sizes, "batch_size": cfg.cameras.batch_size,
        "n_gaussians": {"start": n_start, "end": system.model.num_gaussians},
        "total_s": total,
        "before_main_s": args.before_main_s,
        "phases_s": phases,
        "phases_sum_s": measured,
        "unattributed_s": total - measured,
        "steps_s": steps_s,
        "step_s": {"mean": steps_s / max(1, len(times)), "median": statistics.median(times) if times else 0.0,
                   "first": times[0] if times else 0.0, "max": max(times, default=0.0)},
        "step_fractions": {**{name: phases[name] / steps_s for name in STEP_PHASES},
                           "unattributed": (steps_s - step_measured) / steps_s},
        "renderer_s": renderer,
        "renderer_fraction_of_step": renderer / steps_s,
        "groups_s": groups,
        "group_fractions_of_total": {group: s / total for group, s in groups.items()},
        "details_s": {
            "prior_unet": sec.get("prior_unet", 0.0), "prior_encode": sec.get("prior_encode", 0.0),
            "eval_render": sec.get("eval_render", 0.0),
            "exports_by_format": {k[len("export_"):]: v for k, v in sec.items() if k.startswith("export_")},
        },
        "calls": dict(timers.calls),
        "targets": {**TARGETS, "renderer_met": renderer / steps_s < TARGETS["renderer_fraction_of_step_below"],
                    "total_met": total < TARGETS["total_s_below"]},
        "run_dir": str(run_dir) if args.keep_output else None,
    }


def process_age_s() -> float | None:
    """Seconds since this process started (Linux /proc, 10 ms resolution), or None elsewhere."""
    try:
        with open("/proc/self/stat") as f:
            started = int(f.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
        with open("/proc/uptime") as f:
            return float(f.read().split()[0]) - started
    except (OSError, ValueError, IndexError):
        return None


def compare(args, argv: list[str]) -> dict:
    """The same profile for the torch and cpp rasterizers, each in a fresh process."""
    base = [a for a in argv if a != "--compare"]
    runs = {}
    for backend in ("torch", "cpp"):
        cmd = [sys.executable, os.path.abspath(__file__), *base, "--backend", backend]
        begin = time.perf_counter()
        done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        wall = time.perf_counter() - begin
        runs[backend] = json.loads(done.stdout) if done.returncode == 0 else {"error": f"exit status {done.returncode}"}
        runs[backend]["process_wall_s"] = wall  # interpreter start to exit, as a shell would time it
    t, c = runs["torch"], runs["cpp"]
    ok = "error" not in t and "error" not in c
    ratio = lambda key: c[key] / t[key] if ok and t[key] else None  # noqa: E731
    return {
        "benchmark": "profile of the default text-to-3D run: torch vs cpp rasterizer", "runs": runs,
        "renderer_fraction_of_step": {k: r.get("renderer_fraction_of_step") for k, r in runs.items()},
        "ratios_cpp_over_torch": {"renderer_s": ratio("renderer_s"), "steps_s": ratio("steps_s"),
                                  "total_s": ratio("total_s")},
    }


def main(argv: list[str] | None = None) -> dict:
    start = time.perf_counter()
    age = process_age_s()
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt", default="a red mug", help="the prompt (the README's main command uses this one)")
    parser.add_argument("--max-steps", type=int, default=0, help="shorten the run (0: the preset's max_steps)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the cpp kernel follows them)")
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "cpp"], help="rasterizer backend")
    parser.add_argument("--compare", action="store_true", help="profile torch and cpp, each in a fresh process")
    parser.add_argument("--quick", action="store_true", help="6 steps at 32^2 with every phase: a smoke test")
    parser.add_argument("--override", nargs="*", default=[], help="more config overrides, e.g. turntable_frames=0")
    parser.add_argument("--output-dir", help="keep the run folder under this directory (default: a temporary one)")
    args = parser.parse_args(argv)
    if args.compare:
        result = compare(args, argv)
    else:
        args.load_average = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        args.before_main_s = age
        args.keep_output = args.output_dir is not None
        with tempfile.TemporaryDirectory() as tmp:
            args.output_dir = str(Path(args.output_dir or tmp).resolve())
            result = profile(args, start)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()

"""Speed of neural-field rendering and of one DreamFusion SDS step on CPU, as JSON.

    python benchmarks/bench_fields.py                    # 5 repeats
    python benchmarks/bench_fields.py --quick            # 1 repeat, 16^2 renders (a smoke test)
    python benchmarks/bench_fields.py --threads 2 --repeats 3

Two measurements, each on the default `HashGridField` and `TriplaneField` as initialized (Magic3D's
blob of radius 0.5: the field every run starts from), 4 cameras of 64 x 64 (16,384 rays) from the
default orbit, `VolumeRendererConfig` defaults otherwise:

- **render**: `VolumeRenderer` forward and backward of a loss on rgb (and on the normal map when
  normals are on) to every field parameter, in rays per second. The reference in the same run is
  dense sampling — the same renderer with the occupancy grid off, every step of every ray through
  the box evaluated — so `speedup_vs_dense` is what empty-space skipping buys. Rows for normals
  "none" and "analytic" (DreamFusion's shading needs them; a double backward through the field).
- **sds_step**: one training step of the `dreamfusion` preset (render, SDS on the shipped text
  prior, regularizers, backward, Adam) and its split: render forward + backward of the render,
  and the prior's UNet (forward of the guidance), timed inside the step.

Min and median of `--repeats` runs after a warm-up, variants interleaved round by round so a change
of machine load hits them alike; compare ratios on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch


def _stats(values: list[float]) -> dict:
    return {"min_s": round(min(values), 4), "median_s": round(statistics.median(values), 4)}


def _cameras(size: int, seed: int = 0):
    from gen3d.cameras import OrbitConfig, sample_orbit

    return sample_orbit(OrbitConfig(batch_size=4), torch.Generator().manual_seed(seed), width=size, height=size)


def bench_render(size: int, repeats: int) -> list[dict]:
    from gen3d.rendering.volume import VolumeRenderer, VolumeRendererConfig
    from gen3d.representations.fields import HashGridField, TriplaneField

    torch.manual_seed(0)
    fields = {"hashgrid": HashGridField(), "triplane": TriplaneField()}
    cams = _cameras(size)
    rows = []
    for normals in ("none", "analytic"):
        renderers = {grid: VolumeRenderer(VolumeRendererConfig(occupancy_grid=grid == "grid", normals=normals))
                     for grid in ("grid", "dense")}
        for name, field in fields.items():
            renderers["grid"].grid.update(field.density, 0)  # the grid of the field as it is
            times = {"grid": [], "dense": []}
            samples = {}

            def step(kind: str) -> None:
                g = torch.Generator().manual_seed(1)
                out = renderers[kind](field, cams, generator=g, train=True)
                loss = out.rgb.square().mean() + (out.normal.square().mean() if out.normal is not None else 0)
                loss.backward()
                field.zero_grad(set_to_none=True)
                samples[kind] = len(out.samples.weights) / out.samples.n_rays

            for kind in times:  # warm-up
                step(kind)
            for _ in range(repeats):
                for kind in times:
                    t0 = time.perf_counter()
                    step(kind)
                    times[kind].append(time.perf_counter() - t0)
            n_rays = len(cams) * size * size
            row = {"field": name, "normals": normals, "rays": n_rays}
            for kind in times:
                row[kind] = {**_stats(times[kind]), "rays_per_s": round(n_rays / min(times[kind])),
                             "samples_per_ray": round(samples[kind], 1)}
            row["speedup_vs_dense"] = round(min(times["dense"]) / min(times["grid"]), 2)
            rows.append(row)
    return rows


def bench_sds_step(size: int, repeats: int) -> list[dict]:
    """Time steps of the `dreamfusion` preset on the shipped prior, split by hooks on the renderer and UNet."""
    import tempfile
    from pathlib import Path

    from gen3d.cli import load_run_config
    from gen3d.runs import new_run_dir

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for geometry in ("hashgrid", "triplane"):
            system_cls, cfg = load_run_config("dreamfusion", [
                "prompt=a red mug", f"geometry={geometry}", f"render_size={size}", f"output_dir={tmp}",
                "progress=false", f"max_steps={repeats + 2}", "val_every=0", "checkpoint_every=0"])
            system = system_cls(cfg, new_run_dir(Path(tmp), system_cls.name, f"{geometry}"))
            system.ensure_training()
            timers = {"render_fwd": 0.0, "unet": 0.0}
            _wrap(system.renderer, "forward", timers, "render_fwd")
            _wrap(system.prior, "predict_noise", timers, "unet")
            steps, render, unet = [], [], []
            for step in range(1, repeats + 2):
                for k in timers:
                    timers[k] = 0.0
                t0 = time.perf_counter()
                system.training_step(step)
                if step > 1:  # the first step is a warm-up
                    steps.append(time.perf_counter() - t0)
                    render.append(timers["render_fwd"])
                    unet.append(timers["unet"])
            rows.append({"geometry": geometry, "render_size": size, "cameras": cfg.cameras.batch_size,
                         "normals": cfg.renderer.normals, "step": _stats(steps), "render_forward": _stats(render),
                         "prior_unet": _stats(unet),
                         "rest (render backward, guidance, optimizer)": round(
                             statistics.median(steps) - statistics.median(render) - statistics.median(unet), 4)})
    return rows


def _wrap(obj, name: str, timers: dict, key: str) -> None:
    inner = getattr(obj, name)

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            timers[key] += time.perf_counter() - t0

    setattr(obj, name, timed)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=64, help="render size (pixels per side)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="1 repeat at 16^2: a smoke test")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.repeats, args.size = 1, 16
    report = {"benchmark": "neural-field rendering and SDS step", "threads": torch.get_num_threads(),
              "repeats": args.repeats, "load_average_at_start": round(os.getloadavg()[0], 2),
              "render": bench_render(args.size, args.repeats), "sds_step": bench_sds_step(args.size, args.repeats)}
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()

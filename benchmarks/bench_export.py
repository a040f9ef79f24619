"""Mesh export measured against ground truth on the Shapes world.

What users export is a text-to-3D result, so each prompt is first run with a preset (`dreamgaussian`
for 3D Gaussians, `dreamfusion` for a hash-grid field; embedded prior, seed 0), then exported the way a
run exports, and the mesh is compared both with the object's exact surface
(`gen3d.world.metrics.ground_truth_mesh`, marching cubes of the SDF at 192^3), which includes the
generation's own error, and with the result's own renders, which isolates the export's:

- **iso-level**: gen3d's automatic level (`gen3d.export.surface`) against the reference recipes' fixed
  levels (DreamGaussian: density 1; threestudio's fields: 25) and a second fixed level: Chamfer
  distance, normal consistency and F-score at 0.01 against the ground truth (`mesh_distance`), and the
  silhouette IoU of the mesh's renders against the ground truth's and against the result's own.
- **texture**: mean CIEDE2000 of renders against the ground truth's and against the result's own
  albedo renders, over 16 views, for the mesh with vertex colors, the baked texture, and the texture
  refined against the result's renders (``texture_refine.mode=render``), and the texture refined by SDS
  with the run's prior (``texture_refine.mode=sds``).
- **time** of each export step: surface extraction, clean-up (decimation to `--faces`), UV unwrap and
  bake, refinement, writing the GLB.
- **clean-up backends** (`gen3d.export.cleanup`): each installed library decimates ground-truth
  surfaces to a fifth of their faces; Chamfer distance to the exact surface and time (min / median of
  `--repeats`, interleaved).

    python benchmarks/bench_export.py                   # 6 Gaussian + 2 field runs, ~15 minutes on 2 cores
    python benchmarks/bench_export.py --quick           # 1 10-step Gaussian run, small settings (smoke test)

Prints one JSON object: per-run rows and a summary (means over runs, per representation).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from gen3d.cameras import sample_orbit
from gen3d.errors import Gen3dError
from gen3d.export.cleanup import available_mesh_backends, clean_mesh
from gen3d.export.mesh import save_mesh, vertex_colored
from gen3d.export.refine import TextureRefineConfig, refine_texture, render_loss
from gen3d.export.surface import extract_surface
from gen3d.export.texture import bake, textured_mesh
from gen3d.rendering.mesh import MeshQuery
from gen3d.world.catalog import WorldObject, parse_prompt
from gen3d.world.metrics import color_error, delta_e, eval_cameras, ground_truth_mesh, mesh_distance, silhouette_iou

GAUSSIAN_PROMPTS = ["a red mug", "an orange cube", "a teal torus", "a pink house", "a yellow snowman", "a blue rocket"]
FIELD_PROMPTS = ["a red mug", "a pink house"]
LEVELS = {"gaussians": {"auto": "auto", "dreamgaussian (1)": 1.0, "fixed 0.5": 0.5},
          "field": {"auto": "auto", "threestudio (25)": 25.0, "fixed 5": 5.0}}


def train(prompt: str, config: str, overrides: list[str], out_dir: Path):
    """A finished run of `config` on `prompt` -> (system, seconds)."""
    from gen3d.cli import load_run_config
    from gen3d.runs import new_run_dir
    from gen3d.systems.base import write_config

    system_cls, cfg = load_run_config(config, [f"prompt={prompt}", f"output_dir={out_dir}", "progress=false",
                                               "exports=[]", "turntable_frames=0", "val_every=0", "checkpoint_every=0",
                                               *overrides])
    run = new_run_dir(cfg.output_dir, system_cls.name, prompt)
    write_config(run, cfg)
    system = system_cls(cfg, run)
    t0 = time.perf_counter()
    system.fit()
    return system, time.perf_counter() - t0


class _Own:
    """A result's own albedo renders as a metrics `Query` (for comparing its mesh with it)."""

    def __init__(self, system) -> None:
        self.system = system

    @torch.no_grad()
    def render(self, cameras):
        return self.system.albedo_render(cameras.to(self.system.device))


def _agreement(mesh_query, own, cameras) -> tuple[float, float]:
    """Silhouette IoU (alpha > 0.5) and mean CIEDE2000 where both cover, between a mesh's and a result's renders."""
    a, b = mesh_query.render(cameras), own.render(cameras)
    ma, mb = a.alpha[..., 0] > 0.5, b.alpha[..., 0] > 0.5
    both = ma & mb
    return float(both.sum() / (ma | mb).sum().clamp_min(1)), float(delta_e(a.rgb[both], b.rgb[both]).mean())


def _timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def measure_run(prompt: str, kind: str, args, out_dir: Path) -> dict:
    config = "dreamgaussian" if kind == "gaussians" else "dreamfusion"
    obj = parse_prompt(prompt)
    quick = ["max_steps=10", "gaussians.num_points=300", "render_sizes=[32]", "cameras.batch_size=2"]
    system, train_seconds = train(prompt, config, [f"seed={args.seed}"] + (quick if args.quick else []), out_dir)
    rep, own = system.representation(), _Own(system)
    cams = eval_cameras(args.eval_size)  # 8 azimuths x elevations 10 and 40
    gt = ground_truth_mesh(obj, 192)
    row = {"prompt": prompt, "representation": kind, "train_seconds": round(train_seconds, 1),
           "result_silhouette_iou_gt": round(silhouette_iou(system.query(), obj, cams), 4), "levels": {}}
    for label, level in LEVELS[kind].items():
        try:
            mesh, seconds = _timed(extract_surface, rep, resolution=args.resolution, threshold=level)
        except Gen3dError as e:  # a fixed level the density never reaches: no mesh
            row["levels"][label] = {"error": str(e).split(";")[0]}
            continue
        d = mesh_distance(mesh, gt, samples=args.samples)
        sil_own, _ = _agreement(MeshQuery(mesh), own, cams)
        row["levels"][label] = {
            "threshold": round(float(mesh.metadata["threshold"]), 4), "faces": len(mesh.faces),
            "chamfer_1e3": round(d.chamfer * 1e3, 2), "normal_consistency": round(d.normal_consistency, 4),
            "f_score": round(d.f_score, 4), "silhouette_iou_gt": round(silhouette_iou(MeshQuery(mesh), obj, cams), 4),
            "silhouette_iou_own": round(sil_own, 4), "seconds": round(seconds, 2)}
    # The full export at the automatic level, step by step, as System.save_surface does it.
    steps = {}
    mesh, steps["extract"] = _timed(extract_surface, rep, resolution=args.resolution)
    clean, steps["clean_up"] = _timed(clean_mesh, mesh, faces=args.faces)
    d = mesh_distance(clean, gt, samples=args.samples)
    row["cleaned"] = {"faces": len(clean.faces), "backend": clean.metadata["mesh_backend"],
                      "chamfer_1e3": round(d.chamfer * 1e3, 2), "normal_consistency": round(d.normal_consistency, 4)}
    with torch.no_grad():
        points = torch.as_tensor(clean.vertices, dtype=torch.float32, device=system.device)
        colored = vertex_colored(clean, system.surface_color(points))
        parts, steps["unwrap_bake"] = _timed(bake, clean.vertices, clean.faces, system.surface_color, size=args.texture,
                                             device=system.device)
    refine_cfg = TextureRefineConfig(steps=args.refine_steps, resolution=args.refine_size)
    gen = torch.Generator().manual_seed(args.seed)
    orbit = replace(system.cfg.cameras, batch_size=refine_cfg.batch_size)
    (refined, losses), steps["refine"] = _timed(
        refine_texture, *parts, render_loss(system.albedo_render),
        lambda step: sample_orbit(orbit, gen, width=refine_cfg.resolution, height=refine_cfg.resolution),
        refine_cfg, device=system.device, progress=False)
    system.cfg.texture_refine = replace(refine_cfg, mode="sds")  # SDS with the run's prior (not an export step: timed apart)
    sds_refined, sds_seconds = _timed(system.refine_texture, *parts)
    with tempfile.TemporaryDirectory() as tmp:
        _, steps["write_glb"] = _timed(save_mesh, Path(tmp) / "mesh.glb", textured_mesh(*parts[:3], refined))
    row["color_de_gt"], row["color_de_own"] = {}, {}
    for label, m in (("vertex_colors", colored), ("baked_texture", textured_mesh(*parts)),
                     ("refined_texture", textured_mesh(*parts[:3], refined)),
                     ("sds_refined_texture", textured_mesh(*parts[:3], sds_refined))):
        row["color_de_gt"][label] = round(color_error(MeshQuery(m), obj, cams), 3)
        row["color_de_own"][label] = round(_agreement(MeshQuery(m), own, cams)[1], 3)
    row["color_de_gt"]["result itself"] = round(color_error(own, obj, cams), 3)
    row["refine_loss"] = [round(losses[0], 5), round(losses[-1], 5)] if losses else None
    row["export_seconds"] = {k: round(v, 2) for k, v in steps.items()} | {"total": round(sum(steps.values()), 2)}
    row["sds_refine_seconds"] = round(sds_seconds, 2)
    return row


def cleanup_backends(names: list[str], repeats: int, samples: int) -> dict:
    """Each installed clean-up backend decimating ground-truth surfaces (128^3 marching cubes) to a fifth."""
    from gen3d.export.field_mesh import density_grid_of
    from gen3d.export.mesh import isosurface_mesh

    out = {}
    backends = available_mesh_backends()
    for name in names:
        obj = WorldObject(*name.split(":"))
        gt = ground_truth_mesh(obj, 192)
        source = isosurface_mesh(density_grid_of(lambda p: -obj.sdf(p), 128, 1.0), 1.0, 0.0)
        target = len(source.faces) // 5
        times = {b: [] for b in backends}
        results = {}
        for _ in range(repeats):  # interleaved
            for b in backends:
                mesh, seconds = _timed(clean_mesh, source, faces=target, backend=b)
                times[b].append(seconds)
                results[b] = mesh
        out[name] = {"faces": [len(source.faces), target]} | {
            b: {"chamfer_1e3": round(mesh_distance(results[b], gt, samples=samples).chamfer * 1e3, 3),
                "seconds_min": round(min(times[b]), 3), "seconds_median": round(statistics.median(times[b]), 3),
                "watertight": bool(results[b].is_watertight)} for b in backends}
    return out


def summarize(rows: list[dict], backends: dict) -> dict:
    def mean(values):
        values = [v for v in values if v is not None and np.isfinite(v)]
        return round(float(np.mean(values)), 4) if values else None

    out = {}
    for kind in LEVELS:
        mine = [r for r in rows if r["representation"] == kind]
        if not mine:
            continue
        levels = {}
        for label in LEVELS[kind]:
            ok = [r["levels"][label] for r in mine if "error" not in r["levels"][label]]
            levels[label] = {"runs_with_mesh": f"{len(ok)}/{len(mine)}"} | {
                k: mean([o[k] for o in ok]) for k in ("chamfer_1e3", "normal_consistency", "f_score", "silhouette_iou_gt",
                                                     "silhouette_iou_own", "seconds")}
        out[kind] = {
            "runs": len(mine), "levels": levels,
            "result_silhouette_iou_gt": mean([r["result_silhouette_iou_gt"] for r in mine]),
            "cleaned": {k: mean([r["cleaned"][k] for r in mine]) for k in ("faces", "chamfer_1e3", "normal_consistency")},
            "color_de_gt": {k: mean([r["color_de_gt"][k] for r in mine]) for k in mine[0]["color_de_gt"]},
            "color_de_own": {k: mean([r["color_de_own"][k] for r in mine]) for k in mine[0]["color_de_own"]},
            "export_seconds": {k: mean([r["export_seconds"][k] for r in mine]) for k in mine[0]["export_seconds"]},
            "sds_refine_seconds": mean([r["sds_refine_seconds"] for r in mine]),
        }
    names = list(backends)
    out["cleanup_backends"] = {
        b: {k: mean([backends[n][b][k] for n in names]) for k in ("chamfer_1e3", "seconds_min", "seconds_median")}
        for b in (backends[names[0]] if names else {}) if b != "faces"}
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", nargs="*", default=GAUSSIAN_PROMPTS, help="prompts of the Gaussian (dreamgaussian) runs")
    p.add_argument("--field-prompts", nargs="*", default=FIELD_PROMPTS, help="prompts of the field (dreamfusion) runs")
    p.add_argument("--resolution", type=int, default=128, help="marching-cubes grid (the runs' mesh_resolution)")
    p.add_argument("--faces", type=int, default=20000, help="decimation target of the full export")
    p.add_argument("--texture", type=int, default=1024)
    p.add_argument("--refine-steps", type=int, default=50)
    p.add_argument("--refine-size", type=int, default=256)
    p.add_argument("--eval-size", type=int, default=128)
    p.add_argument("--samples", type=int, default=20000, help="surface samples per mesh for the distances")
    p.add_argument("--backend-shapes", nargs="*", default=["mug:red", "chair:blue", "rocket:orange"],
                   help="shape:color surfaces the clean-up backends decimate")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="one 10-step Gaussian run and small settings (a smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.prompts, args.field_prompts, args.resolution, args.faces = args.prompts[:1], [], 48, 3000
        args.texture, args.refine_steps, args.refine_size, args.eval_size = 128, 3, 64, 48
        args.samples, args.repeats, args.backend_shapes = 2000, 1, args.backend_shapes[:1]
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as out_dir:
        for kind, prompts in (("gaussians", args.prompts), ("field", args.field_prompts)):
            for prompt in prompts:
                rows.append(measure_run(prompt, kind, args, Path(out_dir)))
                print(f"{kind} {prompt}: {json.dumps(rows[-1])}", file=sys.stderr)
    backends = cleanup_backends(args.backend_shapes, args.repeats, args.samples)
    report = {"settings": vars(args), "torch_threads": torch.get_num_threads(),
              "mesh_backends": available_mesh_backends(), "rows": rows, "cleanup_backends": backends,
              "summary": summarize(rows, backends)}
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()

"""Few-step text-to-3D generation (issue 11): the 25-step flow teacher against its 1- and 2-step students, distilled
by MDT-dist and by consistency distillation, on the Shapes world, in the same run.

**Quality against ground truth.** Each generator samples one colored point set per prompt and seed for ``--objects``
objects spread over the training catalog plus the held-out color/shape pairs (never trained on), from the plain
caption ("a red mug") and ``--seeds`` seeds. Each sample is scored against its object's exact surface
(`bench_latents.surface_scores`: Chamfer = mean of both directed mean distances in world units, F-score at
``--tolerance``, mean rgb error at the surface) and, as Gaussians (`gen3d.models.point_flow.to_gaussians`, what
`gen3d sample` writes), by the aligned 3D IoU (`gen3d.world.metrics.iou_3d`, no normalization). ``ceiling``: the
same scores of a random subset of the ground-truth surface points of the same size, what the latent itself allows.

**Across seeds** (the generated set against the reference set, as point-cloud generation is scored): with every
object's ground-truth points as the reference set R and all samples as G, ``mmd`` = mean over r of the smallest
Chamfer to any g (fidelity), ``coverage`` = the fraction of r that are the nearest reference of some g (modes not
dropped); ``seed_spread``: the mean over objects of the standard deviation of the Chamfer over seeds.

**Latency.** One prompt (text encoding cached) through the sampler, batch 1, ``--repeats`` times after a warm-up at
``--threads`` torch threads (2): min and median milliseconds, and ``speedup`` = the teacher's 25-step median over the row's median.

    python benchmarks/bench_flow.py --student gen3d/shapes-flow --consistency outputs/world/distill-consistency
    python benchmarks/bench_flow.py --quick     # 2 objects, 1 seed, 2 repeats (a smoke test)

``--figure PNG`` also draws, per object (rows), the ground truth and each generator's seed-0 sample as Gaussians
(columns, in the order of the rows of the JSON), from one camera.

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_latents import surface_scores  # noqa: E402

from gen3d.models.point_flow import from_latent, load_point_flow, to_gaussians, to_latent  # noqa: E402
from gen3d.rendering.gaussian import GaussianQuery  # noqa: E402
from gen3d.world.catalog import caption, held_out_objects, training_objects  # noqa: E402
from gen3d.world.metrics import ground_truth_mesh, iou_3d  # noqa: E402
from gen3d.world.recon_data import build_recon_set, chamfer_distance  # noqa: E402


def latency(fn, repeats: int) -> dict[str, float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - start))
    return {"min_ms": round(min(times), 2), "median_ms": round(statistics.median(times), 2)}


def set_scores(samples: list[torch.Tensor], owners: list[int], references: list[torch.Tensor]) -> dict[str, float]:
    """MMD and coverage of the generated sets against the reference sets (squared-distance Chamfer, x1000)."""
    D = torch.stack([torch.stack([chamfer_distance(s[None], r[None])[0] for r in references]) for s in samples])
    nearest = D.argmin(1)  # each sample's nearest reference
    return {"mmd_x1000": round(1000 * D.min(0).values.mean().item(), 3),
            "coverage": round(len(set(nearest.tolist())) / len(references), 3),
            "matched_own_object": round(sum(int(n) == o for n, o in zip(nearest.tolist(), owners)) / len(samples), 3)}


def score_sample(latent: torch.Tensor, obj, truth, tolerance: float) -> dict[str, float]:
    points, colors = from_latent(latent)
    out = surface_scores(points.numpy(), colors.numpy(), obj, truth, tolerance=tolerance)
    out["iou_3d"] = iou_3d(GaussianQuery(to_gaussians(latent)), obj, resolution=48, normalize=False)
    return out


def figure_camera(size: int = 96):
    from gen3d.cameras import spherical_cameras

    one = lambda v: torch.tensor([float(v)])  # noqa: E731
    return spherical_cameras(one(30), one(20), one(2.3), one(45), size, size)


def save_figure(path: Path, objects, columns: list[list[torch.Tensor]]) -> None:
    """Rows: objects; columns: the ground truth, then each generator's sample rendered as Gaussians."""
    from gen3d.export.video import image_grid, save_image
    from gen3d.rendering.gaussian import render_gaussians
    from gen3d.world.render import render_object

    cam, tiles = figure_camera(), []
    for i, obj in enumerate(objects):
        tiles.append(render_object(obj, cam, supersample=2).rgb[0].clamp(0, 1))  # on white
        for latents in columns:
            tiles.append(render_gaussians(to_gaussians(latents[i]), cam, torch.ones(1, 3)).rgb[0].clamp(0, 1))
    save_image(path, image_grid(torch.stack(tiles), nrow=1 + len(columns)))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default="gen3d/shapes-flow-teacher")
    parser.add_argument("--student", default="gen3d/shapes-flow", help="the MDT-dist student")
    parser.add_argument("--consistency", default=None, help="the consistency-distilled student (a folder)")
    parser.add_argument("--objects", type=int, default=12, help="training objects, spread over the catalog")
    parser.add_argument("--held-out", type=int, default=5, help="held-out objects")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--tolerance", type=float, default=0.02, help="F-score distance")
    parser.add_argument("--guidance", type=float, default=None, help="teacher guidance (default: its own)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--figure", type=Path, default=None, help="also write the samples as a PNG")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.objects, args.held_out, args.seeds, args.repeats = 1, 1, 1, 2
    torch.set_num_threads(args.threads)

    train = training_objects()
    objects = [train[i] for i in torch.linspace(0, len(train) - 1, args.objects).round().long().tolist()]
    objects += held_out_objects()[: args.held_out]
    held = {str(o) for o in held_out_objects()}
    truths = [ground_truth_mesh(o) for o in objects]
    prompts = [caption(o.shape, o.color) for o in objects]

    teacher = load_point_flow(args.teacher)
    rows = [("teacher", teacher, 25), ("teacher", teacher, 2), ("teacher", teacher, 1)]
    student = load_point_flow(args.student, text=teacher.text)
    rows += [("mdt", student, 1), ("mdt", student, 2)]
    if args.consistency:
        baseline = load_point_flow(args.consistency, text=teacher.text)
        rows += [("consistency", baseline, 1), ("consistency", baseline, 2)]
    n = teacher.info.points
    surfaces = [build_recon_set([o], views=1, size=8, points=n, seed=7) for o in objects]
    references = [s.points[0] for s in surfaces]

    result = {"objects": [str(o) for o in objects], "points": n, "seeds": args.seeds, "tolerance": args.tolerance,
              "teacher": args.teacher, "student": args.student, "consistency": args.consistency, "rows": []}
    ceiling = [score_sample(to_latent(s.points[0], s.lit[0]), o, t, args.tolerance)
               for s, o, t in zip(surfaces, objects, truths)]
    result["ceiling"] = {k: round(statistics.mean(c[k] for c in ceiling), 4) for k in ceiling[0]}
    teacher_median, columns = None, []
    for method, gen, steps in rows:
        guidance = (args.guidance if args.guidance is not None else gen.info.guidance) if method == "teacher" else 0.0
        timing = latency(lambda: gen(prompts[:1], steps=steps, guidance=guidance), args.repeats)
        if method == "teacher" and steps == 25:
            teacher_median = timing["median_ms"]
        scored, samples, owners = [], [], []
        for seed in range(args.seeds):
            latents = gen(prompts, steps=steps, guidance=guidance, seed=seed)
            if seed == 0:
                columns.append(latents)
            for i, (latent, obj, truth) in enumerate(zip(latents, objects, truths)):
                s = score_sample(latent, obj, truth, args.tolerance)
                s.update(object=i, seed=seed, held_out=str(obj) in held)
                scored.append(s)
                samples.append(latent[:, :3])
                owners.append(i)

        def mean(key, rows_):
            return round(statistics.mean(r[key] for r in rows_), 4) if rows_ else None

        spread = [statistics.pstdev([s["chamfer"] for s in scored if s["object"] == i]) for i in range(len(objects))]
        row = {"method": method, "steps": steps, "guidance": guidance, **timing,
               "speedup": round(teacher_median / timing["median_ms"], 2) if teacher_median else None,
               **{k: mean(k, scored) for k in ("chamfer", "f_score", "color_error", "iou_3d")},
               "held_out": {k: mean(k, [s for s in scored if s["held_out"]]) for k in ("chamfer", "f_score", "iou_3d")},
               "seed_spread": round(statistics.mean(spread), 5),
               **set_scores(samples, owners, references)}
        result["rows"].append(row)
        print(json.dumps({k: row[k] for k in ("method", "steps", "median_ms", "chamfer", "f_score", "iou_3d",
                                               "coverage")}), file=sys.stderr, flush=True)
    if args.figure:
        save_figure(args.figure, objects, columns)
        result["figure"] = str(args.figure)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

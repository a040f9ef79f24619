"""Quality of a text-to-3D recipe on the embedded Shapes world, measured in 3D.

For each prompt a preset (`--config`, default `configs/dreamgaussian.yaml`; any preset on the
embedded prior: dreamfusion, dreamfusion-triplane, magic3d-coarse) runs to the end;
the result is scored against the ground-truth object the prompt names: 3D IoU (centered and
scale-normalized, best over azimuth for rotationally symmetric shapes), silhouette IoU over fixed
views, foreground color error (CIEDE2000) and multi-view consistency. In the same run, the
*initialization* (the Gaussians or the field's blob before any guidance) is scored the same way as the reference, so
the gain of score distillation is a difference measured on one machine at one time.

    python benchmarks/bench_shapes.py                  # seen prompts + held-out combinations
    python benchmarks/bench_shapes.py --quick          # 2 prompts, 40 steps (smoke test)
    python benchmarks/bench_shapes.py --config dreamfusion --prompts "a red mug"
    python benchmarks/bench_shapes.py --prompts "a red mug" "a teal torus" --override max_steps=300

Prints one JSON object: per-prompt figures, then means for seen and held-out prompts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

SEEN = ["a red mug", "an orange cube", "a teal torus", "a pink house", "a gray chair",
        "a yellow snowman", "a green cone", "a blue rocket"]


def held_out_prompts() -> list[str]:
    from gen3d.world.catalog import HELD_OUT, caption

    return [caption(shape, color) for color, shape in HELD_OUT]


def score(query, obj, iou_resolution: int = 64) -> dict[str, float]:
    from gen3d.world import metrics

    mv = metrics.multiview_consistency(query)
    return {
        "iou_3d": float(metrics.iou_3d(query, obj, resolution=iou_resolution)),
        "iou_3d_raw": float(metrics.iou_3d(query, obj, resolution=iou_resolution, solid=False)),
        "silhouette_iou": float(metrics.silhouette_iou(query, obj)),
        "color_error": float(metrics.color_error(query, obj)),
        "consistency_delta_e": float(mv.delta_e),
        "consistency_matched": float(mv.matched_fraction),
    }


def run_prompt(prompt: str, overrides: list[str], out_dir: Path, config: str = "dreamgaussian",
               iou_resolution: int = 64) -> dict:
    from gen3d.cli import load_run_config
    from gen3d.runs import new_run_dir
    from gen3d.systems.base import write_config
    from gen3d.world.catalog import parse_prompt

    obj = parse_prompt(prompt)
    if obj is None:
        raise SystemExit(f"'{prompt}' names no Shapes-world object (see gen3d world catalog)")
    system_cls, cfg = load_run_config(config, [f"prompt={prompt}", f"output_dir={out_dir}", "progress=false",
                                                        "exports=[]", "turntable_frames=0", "val_every=0",
                                                        "checkpoint_every=0", *overrides])
    run = new_run_dir(cfg.output_dir, system_cls.name, prompt)
    write_config(run, cfg)
    system = system_cls(cfg, run)
    baseline = score(system.query(), obj, iou_resolution)
    t0 = time.perf_counter()
    system.fit()
    seconds = time.perf_counter() - t0
    result = score(system.query(), obj, iou_resolution)
    return {"prompt": prompt, "object": str(obj), "seconds": round(seconds, 1), "steps": cfg.max_steps,
            **({"n_gaussians": system.model.num_gaussians} if hasattr(system, "model") else {}), **{k: round(v, 4) for k, v in result.items()},
            "init": {k: round(v, 4) for k, v in baseline.items()}, "run": str(run)}


def summarize(rows: list[dict]) -> dict:
    if not rows:
        return {}
    keys = ["seconds", "iou_3d", "iou_3d_raw", "silhouette_iou", "color_error", "consistency_delta_e", "consistency_matched"]
    def mean(values):
        values = [v for v in values if v == v]  # color error is NaN when nothing overlaps
        return round(statistics.mean(values), 4) if values else float("nan")

    out = {f"mean_{k}": mean(r[k] for r in rows) for k in keys}
    out.update({f"init_mean_{k}": mean(r["init"][k] for r in rows) for k in keys[1:]})
    out["n"] = len(rows)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="dreamgaussian", help="preset or YAML file of the recipe (default: dreamgaussian)")
    parser.add_argument("--prompts", nargs="*", help="prompts to run (default: the seen list and the held-out pairs)")
    parser.add_argument("--override", nargs="*", default=[], help="config overrides for every run, e.g. max_steps=300")
    parser.add_argument("--quick", action="store_true", help="2 prompts, 40 steps, 3D IoU on a 32^3 grid: a smoke "
                        "test of the script")
    parser.add_argument("--output-dir", help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--iou-resolution", type=int,
                        help="voxels per side of the 3D IoU grid (default: 64, 32 with --quick)")
    parser.add_argument("--shard", default="1/1", help="K/N: run every N-th prompt starting at the K-th, to split "
                        "the list over parallel processes (merge their JSON with benchmarks/merge_shards.py)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = list(args.override)
    if args.quick:
        seen, held = SEEN[:1], held_out_prompts()[:1]
        overrides = ["max_steps=40", *overrides]
    elif args.prompts:
        seen, held = args.prompts, []
    else:
        seen, held = SEEN, held_out_prompts()
    iou_resolution = args.iou_resolution or (32 if args.quick else 64)
    k, n = (int(x) for x in args.shard.split("/"))
    if not 1 <= k <= n:
        raise SystemExit(f"--shard must be K/N with 1 <= K <= N, got {args.shard}")
    tagged = [("seen", p) for p in seen] + [("held_out", p) for p in held]
    tagged = tagged[k - 1::n]
    seen = [p for g, p in tagged if g == "seen"]
    held = [p for g, p in tagged if g == "held_out"]
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(args.output_dir or tmp)
        rows = {"seen": [], "held_out": []}
        for group, prompts in (("seen", seen), ("held_out", held)):
            for prompt in prompts:
                row = run_prompt(prompt, overrides, out_dir, args.config, iou_resolution)
                print(json.dumps(row), file=sys.stderr)
                rows[group].append(row)
    report = {
        "benchmark": "shapes-text-to-3d", "config": args.config, "overrides": overrides,
        "threads": torch.get_num_threads(), "iou_resolution": iou_resolution,
        "seen": rows["seen"], "held_out": rows["held_out"],
        "summary": {"seen": summarize(rows["seen"]), "held_out": summarize(rows["held_out"])},
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()

"""Score-distillation guidances compared on the embedded Shapes world: one recipe, one budget, the same seeds.

Each method (`guidance.type`: sds, vsd, cds, asd; see `gen3d.guidance`) runs the same preset
(`--config`, default dreamgaussian) on every prompt with every seed, through `bench_shapes.run_prompt`,
and is scored as there (3D IoU, silhouette IoU, color error, multi-view consistency, and the
initialization's scores) plus the failure modes score distillation is known for
(`gen3d.world.metrics`):

- seconds per step (the training loop's own clock, from the run's metrics.jsonl);
- saturation: mean CIELAB chroma of the result's renders, next to the ground truth's from the same
  views (a ratio above 1 is over-saturated);
- multi_face, for objects with a front (mug, house, chair, snowman, rocket): a correct front and a
  front again on the back (the Janus problem);
- seed diversity, per method and prompt: mean 1 - 3D IoU between the results of different seeds
  (0: every seed gives the same shape). All seeds of a (method, prompt) run in one process, so
  `--shard` splits the (method, prompt) pairs, not the runs.

    python benchmarks/bench_guidance.py                            # sds vsd cds asd x seen prompts x seeds 0 1
    python benchmarks/bench_guidance.py --quick --methods sds      # 2 prompts, 2 seeds, 30 steps (smoke test)
    python benchmarks/bench_guidance.py --methods sds vsd --method-override vsd guidance.vsd.lr=1e-3
    python benchmarks/bench_guidance.py --shard 1/2 > a.json & python benchmarks/bench_guidance.py --shard 2/2 > b.json
    python benchmarks/bench_guidance.py --merge a.json b.json      # one report, one summary
    python benchmarks/bench_guidance.py --merge a.json b.json --figure docs/guidance.png   # and the renders
    python benchmarks/bench_guidance.py --timing 3 --threads 2     # seconds per step, interleaved, min/median

Prints one JSON object: per-run rows, per-(method, prompt) seed diversity, then a summary per method.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_shapes import SEEN, run_prompt

METHODS = ["sds", "vsd", "cds", "asd"]
QUICK_STEPS = 30


def load_result(run: str):
    """The trained System of a finished run folder (its final checkpoint; no prior needed)."""
    from gen3d.cli import load_run_config

    system_cls, cfg = load_run_config(run, ["progress=false"])
    system = system_cls(cfg, Path(run))
    system.resume(model_only=True)
    return system


def seconds_per_step(run: str, fallback: float) -> float:
    """Mean seconds per training step: the last record of the run's metrics.jsonl (the loop's own clock,
    without the scoring and final outputs around it), else `fallback`."""
    path = Path(run) / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    if not lines:
        return fallback
    last = json.loads(lines[-1])
    return last["time"] / max(last["step"], 1)


def failure_scores(query, obj) -> dict:
    """Saturation (and the ground truth's), and multi_face for objects with a front."""
    from gen3d.world.metrics import ObjectQuery, multi_face, saturation

    row = {"saturation": round(saturation(query), 3), "gt_saturation": round(saturation(ObjectQuery(obj)), 3)}
    if obj.shape_def.has_front:
        mf = multi_face(query, obj)
        row["multi_face"] = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in vars(mf).items()}
    return row


def run_group(method: str, prompt: str, seeds: list[int], overrides: list[str], out_dir: Path, config: str,
              log=None, iou_resolution: int = 64) -> tuple[list[dict], dict]:
    """All seeds of one method on one prompt: per-run rows, and the group's seed diversity."""
    from gen3d.world.catalog import parse_prompt
    from gen3d.world.metrics import seed_diversity

    obj = parse_prompt(prompt)
    rows, queries = [], []
    for seed in seeds:
        row = run_prompt(prompt, [f"guidance.type={method}", f"seed={seed}", *overrides], out_dir, config,
                         iou_resolution)
        system = load_result(row["run"])
        query = system.query()
        row = {"method": method, "seed": seed, **row,
               "seconds_per_step": round(seconds_per_step(row["run"], row["seconds"] / row["steps"]), 4),
               **failure_scores(query, obj)}
        if log:
            print(json.dumps(row), file=log)
        rows.append(row)
        queries.append(query)
    diversity = seed_diversity(queries, best_over_azimuth=obj.shape_def.rotational_symmetry) if len(queries) > 1 \
        else float("nan")
    return rows, {"method": method, "prompt": prompt, "seeds": seeds, "seed_diversity": round(diversity, 4)}


def _mean(values) -> float:
    values = [v for v in values if not math.isnan(v)]  # NaN: color error with no overlap, diversity of one seed
    return round(statistics.mean(values), 4) if values else float("nan")


def summarize(runs: list[dict], groups: list[dict]) -> dict:
    """Per method: means over its runs (diversity: over its prompts), multi-face rate with its count."""
    out = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        rows = [r for r in runs if r["method"] == method]
        fronted = [r["multi_face"] for r in rows if "multi_face" in r]
        gt_sat = _mean(r["gt_saturation"] for r in rows)
        sat = _mean(r["saturation"] for r in rows)
        summary = {f"mean_{k}": _mean(r[k] for r in rows)
                   for k in ("iou_3d", "iou_3d_raw", "silhouette_iou", "color_error", "consistency_delta_e",
                             "seconds_per_step")}
        summary.update({
            "mean_saturation": sat, "mean_gt_saturation": gt_sat,
            # ratio of means: a gray object's chroma near 0 would make a mean of ratios meaningless
            "saturation_ratio": round(sat / gt_sat, 4) if gt_sat > 0 else float("nan"),
            "mean_seed_diversity": _mean(g["seed_diversity"] for g in groups if g["method"] == method),
            "multi_face_rate": round(sum(m["is_multi_face"] for m in fronted) / len(fronted), 4) if fronted
            else float("nan"),
            "multi_face_count": sum(m["is_multi_face"] for m in fronted),
            "front_ok_count": sum(m["front_ok"] for m in fronted),
            "has_front_runs": len(fronted),
            "runs": len(rows),
        })
        out[method] = summary
    return out


def merge(paths: list[str]) -> dict:
    """One report from the JSON reports of `--shard K/N` processes."""
    reports = [json.loads(Path(p).read_text()) for p in paths]
    merged = {k: v for k, v in reports[0].items() if k not in ("runs", "groups", "summary", "shard")}
    merged["runs"] = [row for r in reports for row in r["runs"]]
    merged["groups"] = [g for r in reports for g in r["groups"]]
    merged["summary"] = summarize(merged["runs"], merged["groups"])
    merged["shards"] = len(reports)
    return merged


def time_steps(methods: list[str], config: str, overrides: list[str], per_method: dict[str, list[str]],
               repeats: int, steps: int, prompt: str = "a red mug", warmup: int = 3) -> dict:
    """Seconds per training step of each method, in this process, interleaved: every repeat times `steps` steps
    of each method in turn (after `warmup` untimed ones), so machine noise hits all methods alike. Returns per
    method the min and median over repeats and their ratio to the first method (the reference, sds)."""
    import time

    from gen3d.cli import load_run_config
    from gen3d.runs import new_run_dir

    times: dict[str, list[float]] = {m: [] for m in methods}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):
            for method in methods:
                system_cls, cfg = load_run_config(config, [f"prompt={prompt}", f"output_dir={tmp}", "progress=false",
                                                           f"guidance.type={method}", *overrides, *per_method[method]])
                system = system_cls(cfg, new_run_dir(cfg.output_dir, system_cls.name, prompt))
                system.ensure_training()
                for step in range(1, warmup + 1):
                    system.training_step(step)
                t0 = time.perf_counter()
                for step in range(warmup + 1, warmup + steps + 1):
                    system.training_step(step)
                times[method].append((time.perf_counter() - t0) / steps)
    ref = methods[0]
    out = {}
    for m in methods:
        out[m] = {"min_s_per_step": round(min(times[m]), 4), "median_s_per_step": round(statistics.median(times[m]), 4),
                  f"min_ratio_to_{ref}": round(min(times[m]) / min(times[ref]), 3),
                  f"median_ratio_to_{ref}": round(statistics.median(times[m]) / statistics.median(times[ref]), 3)}
    return {"prompt": prompt, "repeats": repeats, "steps": steps, "per_method": out}


def figure(report: dict, path: str, seed: int = 0, prompts: list[str] | None = None) -> Path:
    """One image from a report whose run folders still exist: a row per method, a column block per prompt, each
    cell the RGB row of the run's final validation image (4 views from the front around, as `gen3d run` writes it)."""
    import imageio.v3 as iio
    import numpy as np

    methods = list(dict.fromkeys(r["method"] for r in report["runs"]))
    prompts = prompts or list(dict.fromkeys(r["prompt"] for r in report["runs"]))
    rows = []
    for method in methods:
        cells = []
        for prompt in prompts:
            run = next(r["run"] for r in report["runs"] if r["method"] == method and r["prompt"] == prompt
                       and r["seed"] == seed)
            images = sorted((Path(run) / "val").glob("step-*.png"))
            if not images:
                raise SystemExit(f"{run} has no validation image; was it deleted (run without --output-dir)?")
            image = np.asarray(iio.imread(images[-1]))[..., :3]
            cells.append(image[: image.shape[0] // 2])  # the RGB row (the alpha row is below it)
        rows.append(np.concatenate(cells, axis=1))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(out, np.concatenate(rows, axis=0))
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="dreamgaussian",
                        help="preset or YAML file of the recipe (default: dreamgaussian)")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS,
                        help="guidance.type values to compare (default: all four)")
    parser.add_argument("--prompts", nargs="*", help="prompts (default: bench_shapes.SEEN)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1],
                        help="seeds of every (method, prompt) (default: 0 1)")
    parser.add_argument("--override", nargs="*", default=[], help="config overrides for every run, e.g. max_steps=300")
    parser.add_argument("--method-override", nargs=2, action="append", default=[], metavar=("METHOD", "KEY=VALUE"),
                        help="an override for one method's runs only (repeatable), "
                        "e.g. vsd guidance.guidance_scale=7.5")
    parser.add_argument("--quick", action="store_true",
                        help=f"2 prompts, 2 seeds, {QUICK_STEPS} steps, 3D IoU on a 32^3 grid: a smoke test")
    parser.add_argument("--output-dir", help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--iou-resolution", type=int,
                        help="voxels per side of the 3D IoU grid (default: 64, 32 with --quick)")
    parser.add_argument("--shard", default="1/1", help="K/N: run every N-th (method, prompt) pair starting at the "
                        "K-th, to split the work over processes (then --merge their outputs)")
    parser.add_argument("--merge", nargs="+", metavar="FILE", help="merge the JSON outputs of --shard runs and exit")
    parser.add_argument("--figure", metavar="PNG", help="with --merge: also draw the runs' validation renders, a row "
                        "per method (the runs must have been kept with --output-dir)")
    parser.add_argument("--figure-prompts", nargs="+", help="the prompts (columns) of --figure (default: all)")
    parser.add_argument("--timing", type=int, metavar="REPEATS", help="instead of the benchmark: seconds per step of "
                        "each method, interleaved, REPEATS times (min, median, ratio to the first method)")
    args = parser.parse_args(argv)
    if args.merge:
        report = merge(args.merge)
        if args.figure:
            report["figure"] = str(figure(report, args.figure, prompts=args.figure_prompts))
        print(json.dumps(report, indent=2))
        return report
    if args.threads:
        torch.set_num_threads(args.threads)
    per_method: dict[str, list[str]] = {m: [] for m in args.methods}
    for method, override in args.method_override:
        if method not in per_method:
            raise SystemExit(f"--method-override names '{method}', which is not among --methods {args.methods}")
        per_method[method].append(override)
    if args.timing:
        steps = 3 if args.quick else 20
        report = {"benchmark": "guidance-step-time", "config": args.config, "threads": torch.get_num_threads(),
                  "method_overrides": per_method,
                  **time_steps(args.methods, args.config, list(args.override), per_method, args.timing, steps)}
        print(json.dumps(report, indent=2))
        return report
    overrides, prompts, seeds = list(args.override), list(args.prompts or SEEN), args.seeds
    iou_resolution = args.iou_resolution or (32 if args.quick else 64)
    if args.quick:
        prompts, seeds = (args.prompts or SEEN)[:2], args.seeds[:2]
        overrides = [f"max_steps={QUICK_STEPS}", *overrides]
    k, n = (int(x) for x in args.shard.split("/"))
    if not 1 <= k <= n:
        raise SystemExit(f"--shard must be K/N with 1 <= K <= N, got {args.shard}")
    pairs = [(m, p) for m in args.methods for p in prompts][k - 1::n]
    runs, groups = [], []
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(args.output_dir or tmp)
        for method, prompt in pairs:
            rows, group = run_group(method, prompt, seeds, [*overrides, *per_method[method]], out_dir, args.config,
                                    log=sys.stderr, iou_resolution=iou_resolution)
            runs += rows
            groups.append(group)
            print(json.dumps(group), file=sys.stderr)
    report = {
        "benchmark": "guidance-text-to-3d", "config": args.config, "methods": args.methods, "seeds": seeds,
        "overrides": overrides, "method_overrides": per_method, "threads": torch.get_num_threads(),
        "iou_resolution": iou_resolution, "shard": args.shard, "runs": runs, "groups": groups,
        "summary": summarize(runs, groups),
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()

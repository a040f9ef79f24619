"""Memory over a long run: does the resident set stay flat once the Gaussians stop changing?

The run is the README's main command, `gen3d run dreamgaussian prompt="a red mug"`, made long:
`max_steps=--steps` with `densify.densify_until=280` (the step at which the default 400-step run stops
densifying, pruning and resetting opacities), so after it the number of Gaussians is fixed and memory
has no legitimate reason to grow. Everything else is the preset's: validation renders and checkpoints
every 100 steps, metrics every 10, the log, the progress bar (to /dev/null), the prior's prompt
embeddings, the LR schedule.

Each configuration trains in a fresh worker process (one at a time), which samples every `--every`
steps: VmRSS (/proc/self/status), the Python heap (`sys.getallocatedblocks()`), the number of
Gaussians, open file descriptors and threads. The reference in the same run is the viewer OFF; it is
compared with the viewer ON (a real viser server, with one headless Chromium page connected through
Playwright when Chromium is installed, opened by this parent process). The growth slope is a
least-squares fit of RSS (MB) against step over the samples after `--warmup`, per 1000 steps; the
slope of the second half of that phase is given too (allocators settle, leaks keep going). With
`--tracemalloc` the worker also traces Python allocations after the warm-up and reports the top
growth sites between the warm-up and the end.

    python benchmarks/bench_memory.py                    # 3000 steps, viewer off then on
    python benchmarks/bench_memory.py --steps 1000 --tracemalloc
    python benchmarks/bench_memory.py --quick            # a smoke test (a tiny run, no browser)
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

DENSIFY_UNTIL = 280  # 0.7 of the default 400 steps: where the README's main run stops changing its Gaussian count


def rss_mb() -> float:
    """This process's resident set size in MB (VmRSS)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def slope_per_1000(steps: list[int], values: list[float]) -> float | None:
    """Least-squares slope of `values` against `steps`, per 1000 steps (None with fewer than 3 points)."""
    import numpy as np

    if len(steps) < 3:
        return None
    return round(float(np.polyfit(np.asarray(steps, float), np.asarray(values, float), 1)[0]) * 1000, 3)


# ---- the worker: one training run in this process ---------------------------------------------------
def worker(args: argparse.Namespace) -> dict:
    import gc
    import tracemalloc

    import torch

    from gen3d.cli import load_run_config
    from gen3d.runs import new_run_dir
    from gen3d.systems.base import write_config
    from gen3d.viewer.server import free_port

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = ["prompt=a red mug", f"max_steps={args.steps}", f"densify.densify_until={DENSIFY_UNTIL}",
                 f"output_dir={args.output_dir}", "turntable_frames=0", "exports=[]", *args.override]
    if args.viewer:
        overrides += ["viewer.enabled=true", f"viewer.port={free_port('127.0.0.1', 8700)}"]
    cls, cfg = load_run_config("dreamgaussian", overrides)
    run_dir = new_run_dir(cfg.output_dir, cls.name, cfg.prompt)
    write_config(run_dir, cfg)
    system = cls(cfg, run_dir)
    system.ensure_training()
    samples: list[dict] = []
    traced: dict = {}
    train = system.training_step

    def sample(step: int, out: dict) -> None:
        if args.viewer and step == 1:  # the viewer is up: tell the parent where, so it can connect a browser
            print(json.dumps({"url": system.viewer.url}), flush=True)
        if step % args.every and step != 1:
            return
        if args.tracemalloc and step == args.warmup:
            gc.collect()
            tracemalloc.start(8)
            traced["start"] = tracemalloc.take_snapshot()
        n = out.get("n_gaussians")
        clients = len(system.viewer.server.get_clients()) if args.viewer and system.viewer is not None else 0
        samples.append({"step": step, "rss_mb": round(rss_mb(), 2), "py_blocks": sys.getallocatedblocks(),
                        "n_gaussians": int(n) if n is not None else None, "fds": len(os.listdir("/proc/self/fd")),
                        "threads": threading.active_count(), "clients": clients})
        if args.progress:
            print(json.dumps(samples[-1]), file=sys.stderr, flush=True)

    def training_step(step: int):  # instrumentation only: the step itself is the system's own
        out = train(step)
        sample(step, out)
        return out

    system.training_step = training_step
    t0 = time.perf_counter()
    system.fit()
    seconds = time.perf_counter() - t0
    growth = []
    if args.tracemalloc and "start" in traced:
        gc.collect()
        end = tracemalloc.take_snapshot()
        filters = [tracemalloc.Filter(False, tracemalloc.__file__)]
        stats = end.filter_traces(filters).compare_to(traced["start"].filter_traces(filters), "traceback")
        growth = [{"kb": round(s.size_diff / 1024, 1), "blocks": s.count_diff,
                   "where": [f"{f.filename}:{f.lineno}" for f in s.traceback[-4:]]} for s in stats[:args.top]]
        tracemalloc.stop()
    return {"viewer": args.viewer, "seconds": round(seconds, 1), "samples": samples, "tracemalloc_top_growth": growth}


# ---- the parent: one worker per configuration, then the comparison ----------------------------------
def summarize(run: dict, warmup: int) -> dict:
    """Start, peak, and growth slopes after `warmup` of one worker's samples."""
    s = run["samples"]
    after = [x for x in s if x["step"] >= warmup]
    half = after[len(after) // 2:]
    counts = sorted({x["n_gaussians"] for x in after})
    col = lambda rows, k: [x[k] for x in rows]  # noqa: E731
    return {
        "viewer": run["viewer"], "seconds": run["seconds"], "steps_per_s": round(s[-1]["step"] / run["seconds"], 2),
        "clients_max": max(col(s, "clients")),
        "rss_start_mb": s[0]["rss_mb"], "rss_at_warmup_mb": after[0]["rss_mb"] if after else None,
        "rss_peak_mb": max(col(s, "rss_mb")), "rss_end_mb": s[-1]["rss_mb"],
        "rss_slope_mb_per_1000_steps": slope_per_1000(col(after, "step"), col(after, "rss_mb")),
        "rss_slope_second_half_mb_per_1000_steps": slope_per_1000(col(half, "step"), col(half, "rss_mb")),
        "py_blocks_at_warmup": after[0]["py_blocks"] if after else None, "py_blocks_end": s[-1]["py_blocks"],
        "py_blocks_slope_per_1000_steps": slope_per_1000(col(after, "step"), col(after, "py_blocks")),
        "n_gaussians_after_warmup": counts, "fds_after_warmup": sorted(set(col(after, "fds"))),
        "threads_after_warmup": sorted(set(col(after, "threads"))),
        "tracemalloc_top_growth": run["tracemalloc_top_growth"],
    }


def run_worker(args: argparse.Namespace, viewer: bool, out_dir: str, browser) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--steps", str(args.steps), "--every", str(args.every),
           "--warmup", str(args.warmup), "--threads", str(args.threads), "--top", str(args.top),
           "--output-dir", out_dir, *(["--viewer"] if viewer else []), *(["--tracemalloc"] if args.tracemalloc else []),
           *(["--progress"] if args.progress else []), *(["--override", *args.override] if args.override else [])]
    log = Path(out_dir) / f"worker-{'on' if viewer else 'off'}.stderr"
    with log.open("w") as err:  # the progress bar and the run's log lines; shown when the worker fails
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=None if args.progress else err, text=True,
                                cwd=Path(__file__).resolve().parents[1])
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True)
    reader.start()
    page, result = None, None
    while proc.poll() is None or not lines.empty() or reader.is_alive():
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            if page is not None:
                page.wait_for_timeout(10)  # let Playwright serve its connection while we wait
            continue
        msg = json.loads(line)
        if "url" in msg and browser is not None:
            page = browser.new_page(viewport={"width": 1000, "height": 700})
            page.goto(msg["url"])
        elif "samples" in msg:
            result = msg
    if page is not None:
        page.close()
    if proc.returncode != 0 or result is None:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"{tail}\nbench_memory: the worker (viewer={'on' if viewer else 'off'}) failed, "
                         f"status {proc.returncode}")
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--every", type=int, default=50, help="sample every this many steps")
    parser.add_argument("--warmup", type=int, default=500, help="fit the growth slope from this step on")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--no-client", action="store_true", help="no browser page while the viewer is on")
    parser.add_argument("--tracemalloc", action="store_true", help="trace Python allocations after the warm-up")
    parser.add_argument("--top", type=int, default=10, help="tracemalloc growth sites to report")
    parser.add_argument("--override", nargs="*", default=[], help="extra config overrides")
    parser.add_argument("--output", help="also write the JSON here")
    parser.add_argument("--progress", action="store_true", help="print each sample to stderr")
    parser.add_argument("--quick", action="store_true", help="a tiny 60-step run, no browser: a smoke test")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--viewer", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--output-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)), flush=True)
        return {}
    if args.quick:
        args.steps, args.every, args.warmup, args.no_client = 60, 10, 20, True
        args.override = ["gaussians.num_points=300", "cameras.batch_size=1", "val_every=30", "checkpoint_every=30",
                         *args.override]
    chromium = None if args.no_client else shutil.which("chromium") or shutil.which("chromium-browser")
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for viewer in (False, True):  # the reference first, then the viewer
            if viewer and chromium is not None:
                from playwright.sync_api import sync_playwright

                with sync_playwright() as p:
                    browser = p.chromium.launch(executable_path=chromium, args=[
                        "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                        "--disable-sync", "--no-first-run", "--disable-quic"])
                    runs["on"] = run_worker(args, True, tmp, browser)
                    browser.close()
            else:
                runs["on" if viewer else "off"] = run_worker(args, viewer, tmp, None)
    off, on = summarize(runs["off"], args.warmup), summarize(runs["on"], args.warmup)
    report = {
        "benchmark": "memory-long-run", "command": 'gen3d run dreamgaussian prompt="a red mug"',
        "overrides": [f"max_steps={args.steps}", f"densify.densify_until={DENSIFY_UNTIL}", "turntable_frames=0",
                      "exports=[]", *args.override],
        "steps": args.steps, "sample_every": args.every, "warmup_steps": args.warmup,
        "viewer_off": off, "viewer_on": on,
        "viewer_rss_cost_at_warmup_mb": round(on["rss_at_warmup_mb"] - off["rss_at_warmup_mb"], 1),
        "viewer_extra_slope_mb_per_1000_steps": round(on["rss_slope_mb_per_1000_steps"] - off["rss_slope_mb_per_1000_steps"], 3),
        "samples": {"off": runs["off"]["samples"], "on": runs["on"]["samples"]},
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.output:
        from gen3d.io import write_text_atomic

        write_text_atomic(args.output, text + "\n")
    return report


if __name__ == "__main__":
    main()

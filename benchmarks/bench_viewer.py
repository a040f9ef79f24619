"""What the live viewer costs a run: training speed with the viewer off, and on with browser clients connected.

The reference is the same run without the viewer, measured in the same process, interleaved with
the viewer runs (off, on, off, on, ...) so machine noise hits both alike. Each measurement trains
the preset in a background thread for `--warmup` seconds, then counts the steps of the next
`--window` seconds; with the viewer on, `--clients` headless Chromium pages (Playwright, Debian's
chromium) are connected first and stay connected. Prints steps/s per repeat, min and median, and the
slowdown = 1 - (steps/s with the viewer) / (steps/s without).

    python benchmarks/bench_viewer.py                       # dreamgaussian, 3 repeats, 1 client
    python benchmarks/bench_viewer.py --config dreamfusion --clients 2
    python benchmarks/bench_viewer.py --quick               # a smoke test (short windows)
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch


def measure(config: str, overrides: list[str], viewer: bool, clients: int, warmup: float, window: float,
            out_dir: Path, browser=None) -> dict:
    """Steps per second of one run of `config`, with or without the viewer and its clients."""
    from gen3d.cli import load_run_config
    from gen3d.runs import new_run_dir
    from gen3d.systems.base import Interrupted
    from gen3d.viewer.server import free_port

    extra = [f"viewer.enabled={'true' if viewer else 'false'}", f"viewer.port={free_port('127.0.0.1', 8500)}"]
    cls, cfg = load_run_config(config, [f"output_dir={out_dir}", "progress=false", "max_steps=1000000", "val_every=0",
                                        "checkpoint_every=0", *overrides, *extra])
    system = cls(cfg, new_run_dir(cfg.output_dir, cls.name, getattr(cfg, "prompt", cls.name)))

    def fit():
        try:
            system.fit()
        except Interrupted:
            pass

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    pages = []
    try:
        while system.step < 3:
            time.sleep(0.05)
        if viewer:
            for _ in range(clients):
                page = browser.new_page(viewport={"width": 1000, "height": 700})
                page.goto(system.viewer.url)
                page.get_by_role("button", name="Pause").wait_for(timeout=60000)
                pages.append(page)
        time.sleep(warmup)
        s0, t0 = system.step, time.perf_counter()
        time.sleep(window)
        s1, t1 = system.step, time.perf_counter()
        connected = len(system.viewer.server.get_clients()) if viewer else 0
    finally:
        system._interrupt = True
        thread.join(timeout=120)
        for page in pages:
            page.close()
    return {"viewer": viewer, "clients": connected, "steps": s1 - s0, "steps_per_s": round((s1 - s0) / (t1 - t0), 3)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="dreamgaussian", help="preset (default: dreamgaussian)")
    parser.add_argument("--override", nargs="*", default=[], help="config overrides, e.g. viewer.refresh_every=20")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clients", type=int, default=1, help="browser pages connected while the viewer is on")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds before counting")
    parser.add_argument("--window", type=float, default=20.0, help="seconds counted")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--quick", action="store_true", help="1 repeat, 2 s windows, a tiny run: a smoke test")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = ["prompt=a red mug", *args.override]
    repeats, warmup, window = args.repeats, args.warmup, args.window
    if args.quick:
        repeats, warmup, window = 1, 1.0, 2.0
        overrides = ["gaussians.num_points=300", "cameras.batch_size=1", *overrides]
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("bench_viewer needs Chromium (Debian: apt-get install chromium) and playwright (pip)")
    from playwright.sync_api import sync_playwright

    rows = []
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--disable-quic"])
        for r in range(repeats):
            for viewer in (False, True):
                row = measure(args.config, overrides, viewer, args.clients, warmup, window, Path(tmp), browser)
                rows.append({"repeat": r, **row})
                print(json.dumps(rows[-1]), file=sys.stderr)
        browser.close()
    off = [r["steps_per_s"] for r in rows if not r["viewer"]]
    on = [r["steps_per_s"] for r in rows if r["viewer"]]
    report = {
        "benchmark": "viewer-overhead", "config": args.config, "overrides": overrides, "clients": args.clients,
        "threads": torch.get_num_threads(), "window_s": window, "rows": rows,
        "steps_per_s_off": {"min": min(off), "median": statistics.median(off)},
        "steps_per_s_on": {"min": min(on), "median": statistics.median(on)},
        "slowdown_median": round(1 - statistics.median(on) / statistics.median(off), 4),
        "slowdown_per_repeat": [round(1 - b / a, 4) for a, b in zip(off, on)],
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()

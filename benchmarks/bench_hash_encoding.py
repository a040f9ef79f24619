"""Speed of the hash encoding and triplane sampling on CPU, against their naive references, as JSON.

    python benchmarks/bench_hash_encoding.py                 # P = 2^14 and 2^16 points, 5 repeats
    python benchmarks/bench_hash_encoding.py --quick         # P = 2^12, 1 repeat: a smoke test (~10 s)
    python benchmarks/bench_hash_encoding.py --points 65536 --repeats 3 --threads 2

Encoding: `HashGridConfig`'s defaults (16 levels x 2 features, T = 2^16, resolutions 16..512), tables
uniform in +-1e-4 as at initialization, points uniform in [0, 1]^3. Timed, min and median of
`--repeats` runs after one warm-up, the variants of one measurement interleaved round by round:

- `hash_encode` forward only (under `torch.no_grad`), forward + backward to the tables (the SDS
  training case: sample positions need no gradient), and forward + backward to the tables and x
  (analytic normals), and a double backward (`double_bwd_s`: forward, the gradient w.r.t. x with
  create_graph, then a loss on that gradient back to x and the tables, as a loss on analytic
  normals does), for the backends "torch" (vectorized pure torch) and "cpp" (the compiled
  kernel, when it builds);
- `hash_encode_reference` (a Python loop over levels and corners, plain autograd), forward +
  backward to the tables and the double backward, in the same run; `ratios` are reference time
  over backend time (above 1: the backend is faster) and torch over cpp;
- triplane: `sample_triplane` on `TriplaneConfig`'s default planes (3 x 32 x 64^2, "sum") with its
  backward to the planes, and `sample_triplane_reference` (4-texel gathers);
- whole fields: `HashGridField` and `TriplaneField` with default configs, forward (density + albedo)
  and backward of a loss on both to every parameter;
- optimizer: one Adam step (`torch.optim.Adam`, Instant-NGP's betas and eps) over the 16 x T x 2
  table for T = 2^16 and 2^19, and the allocation of a zero gradient that size, which is why the
  default table is 2^16 rather than Instant-NGP's 2^19.

Run with `nice -n 19` on a shared machine; compare the ratios, which are less sensitive to load
than the absolute times.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from gen3d.ops import hash_encoding
from gen3d.ops.hash_encoding import grid_resolutions, hash_encode, hash_encode_reference
from gen3d.ops.triplane import sample_triplane, sample_triplane_reference
from gen3d.representations.fields import (
    HashGridConfig,
    HashGridField,
    TriplaneConfig,
    TriplaneField,
)

FULL_POINTS = [2**14, 2**16]
QUICK_POINTS = [2**12]


def _time(fns: dict, repeats: int, fewer: dict | None = None) -> dict:
    """Min and median seconds of each callable, after one warm-up each. The callables run in turn within
    each round (interleaved), so that a change of machine load hits them alike; `fewer` maps names to
    a smaller number of rounds (for the slow references)."""
    fewer = fewer or {}
    for fn in fns.values():
        fn()
    times: dict = {name: [] for name in fns}
    for round_ in range(repeats):
        for name, fn in fns.items():
            if round_ >= fewer.get(name, repeats):
                continue
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: {"min": min(t), "median": statistics.median(t), "runs": len(t)} for name, t in times.items()}


def _ratio(a: dict | None, b: dict | None) -> float | None:
    return a["min"] / b["min"] if a and b else None


def bench_encoding(P: int, repeats: int, backends: list[str], reference_repeats: int) -> dict:
    cfg = HashGridConfig()
    res = grid_resolutions(cfg.num_levels, cfg.base_resolution, cfg.finest_resolution)
    gen = torch.Generator().manual_seed(0)
    tables = torch.empty(cfg.num_levels, 2**cfg.log2_hashmap_size, cfg.features_per_level).uniform_(
        -cfg.init_scale, cfg.init_scale, generator=gen).requires_grad_()
    x = torch.rand(P, 3, generator=gen)
    x_grad = x.clone().requires_grad_()
    weights = torch.randn(P, cfg.num_levels * cfg.features_per_level, generator=gen)

    def fwd(backend):
        def run():
            with torch.no_grad():
                hash_encode(x, tables, res, backend=backend)
        return run

    def fwd_bwd(encode, points):
        def run():
            tables.grad = None
            if points.requires_grad:
                points.grad = None
            (encode(points, tables, res) * weights).sum().backward()
        return run

    v = torch.randn(P, 3, generator=gen)

    def double(encode):  # a loss on the gradient w.r.t. x (as on analytic normals), back to x and the tables
        def run():
            tables.grad = None
            points = x.clone().requires_grad_()
            (grad_x,) = torch.autograd.grad((encode(points, tables, res) * weights).sum(), points, create_graph=True)
            (grad_x * v).sum().backward()
        return run

    fns = {}
    for backend in backends:
        def encode(a, b, r, be=backend):
            return hash_encode(a, b, r, backend=be)

        fns[(backend, "fwd_s")] = fwd(backend)
        fns[(backend, "fwd_bwd_tables_s")] = fwd_bwd(encode, x)
        fns[(backend, "fwd_bwd_tables_and_x_s")] = fwd_bwd(encode, x_grad)
        fns[(backend, "double_bwd_s")] = double(encode)
    fns[("reference", "fwd_bwd_tables_s")] = fwd_bwd(hash_encode_reference, x)
    fns[("reference", "double_bwd_s")] = double(hash_encode_reference)
    slow = {("reference", "fwd_bwd_tables_s"): reference_repeats, ("reference", "double_bwd_s"): reference_repeats}
    times = _time(fns, max(repeats, reference_repeats), slow)
    entry: dict = {"points": P}
    for (name, mode), t in times.items():
        entry.setdefault(name, {})[mode] = t
    entry["ratios"] = {f"reference_over_{b}": {mode: _ratio(entry["reference"][mode], entry[b][mode])
                                               for mode in ("fwd_bwd_tables_s", "double_bwd_s")} for b in backends}
    if "cpp" in backends:
        entry["ratios"]["torch_over_cpp"] = {
            mode: _ratio(entry["torch"][mode], entry["cpp"][mode])
            for mode in ("fwd_s", "fwd_bwd_tables_s", "fwd_bwd_tables_and_x_s", "double_bwd_s")}
    return entry


def bench_triplane(P: int, repeats: int, reference_repeats: int) -> dict:
    cfg = TriplaneConfig()
    gen = torch.Generator().manual_seed(0)
    planes = (torch.randn(3, cfg.num_features, cfg.resolution, cfg.resolution, generator=gen) * 0.1).requires_grad_()
    x = torch.rand(P, 3, generator=gen) * 2 - 1
    weights = torch.randn(P, cfg.num_features, generator=gen)

    def run(fn):
        def go():
            planes.grad = None
            (fn(planes, x, cfg.reduce) * weights).sum().backward()
        return go

    times = _time({"fast": run(sample_triplane), "reference": run(sample_triplane_reference)},
                  max(repeats, reference_repeats), {"reference": reference_repeats})
    fast, ref = times["fast"], times["reference"]
    return {"points": P, "planes": list(planes.shape), "reduce": cfg.reduce, "sample_bwd_s": fast,
            "reference_sample_bwd_s": ref, "reference_over_grid_sample": _ratio(ref, fast)}


def bench_fields(P: int, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(P, 3, generator=gen) * 2 - 1
    fields = {"hash_grid": HashGridField(), "triplane": TriplaneField()}

    def run(field):
        def go():
            field.zero_grad(set_to_none=True)
            result = field(x)
            (result.density.mean() + result.features.mean()).backward()
        return go

    times = _time({name: run(field) for name, field in fields.items()}, repeats)
    out = {"points": P}
    for name, field in fields.items():
        out[name] = {"fwd_bwd_s": times[name], "backend": getattr(field.cfg, "backend", None),
                     "parameters": sum(p.numel() for p in field.parameters())}
    return out


def bench_adam(repeats: int, log2_sizes=(16, 19)) -> dict:
    out = {}
    for log2 in log2_sizes:
        table = torch.nn.Parameter(torch.zeros(16, 2**log2, 2))
        table.grad = torch.randn_like(table)
        opt = torch.optim.Adam([table], lr=0.01, betas=(0.9, 0.99), eps=1e-15)
        times = _time({"adam_step_s": opt.step, "zero_gradient_alloc_s": lambda t=table: torch.zeros_like(t)}, repeats)
        out[f"log2_T_{log2}"] = {"parameters": table.numel(), **times}
        del opt, table
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", nargs="*", type=int, help="point counts (default 16384 and 65536)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (after one warm-up)")
    parser.add_argument("--reference-repeats", type=int, default=2, help="timed runs of the slow references")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the cpp kernel follows them)")
    parser.add_argument("--quick", action="store_true", help="P = 4096, 1 repeat: a smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.reference_repeats = 1, 1
    points = args.points or (QUICK_POINTS if args.quick else FULL_POINTS)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    cpp = hash_encoding.EXTENSION.load() is not None  # compiled here once (about 40 s cold), then cached
    build_s = time.perf_counter() - start
    backends = ["torch", "cpp"] if cpp else ["torch"]
    report = {
        "benchmark": "hash_encode and sample_triplane forward+backward, CPU",
        "torch": torch.__version__, "threads": args.threads, "repeats": args.repeats,
        "load_average_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "cpp_available": cpp, "cpp_build_error": hash_encoding.EXTENSION.error, "cpp_build_or_load_s": build_s,
        "config": {"hash_grid": vars(HashGridConfig()), "triplane": vars(TriplaneConfig())},
        "ratios": "reference_over_X: reference time / X time (above 1: X is faster); torch_over_cpp likewise",
        "hash_encoding": [bench_encoding(P, args.repeats, backends, args.reference_repeats) for P in points],
        "triplane": [bench_triplane(P, args.repeats, args.reference_repeats) for P in points],
        "fields": [bench_fields(P, args.repeats) for P in points],
        "adam": bench_adam(args.repeats, (12, 16) if args.quick else (16, 19)),
    }
    torch.set_num_threads(previous_threads)
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])

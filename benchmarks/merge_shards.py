"""Merge the JSON reports of `bench_shapes.py --shard K/N` runs into one report with one summary.

    python benchmarks/merge_shards.py shard1.json shard2.json
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_shapes import summarize  # noqa: E402


def main(paths: list[str]) -> dict:
    reports = [json.loads(Path(p).read_text()) for p in paths]
    merged = {k: v for k, v in reports[0].items() if k not in ("seen", "held_out", "summary")}
    for group in ("seen", "held_out"):
        merged[group] = [row for r in reports for row in r[group]]
    merged["summary"] = {g: summarize(merged[g]) for g in ("seen", "held_out")}
    merged["shards"] = len(reports)
    print(json.dumps(merged, indent=2))
    return merged


if __name__ == "__main__":
    main(sys.argv[1:])

#!/usr/bin/env python
"""Run one benchmark and record its numbers with the machine they came from.

    python scripts/benchmark.py attention            # table on stdout, writes runs/benchmarks/attention.json
    python scripts/benchmark.py kv_cache --json      # one JSON line on stdout (and runs/benchmarks/kv_cache.json)
    python scripts/benchmark.py attention --record   # writes the tracked benchmarks/results/attention.json
    python scripts/benchmark.py attention --quick    # tiny sizes, writes nothing unless --output is given

Benchmarks are the modules listed in ``benchmarks.BENCHMARKS``; each ``run(quick, device)`` returns its config,
summary and rows, to which this script adds the benchmark name and the machine description. A benchmark whose run
also takes ``output_dir`` writes its files (plots) there: the folder of the JSON record. The numbers that the README
quotes live under ``benchmarks/results/``, which only ``--record`` writes; a plain run never overwrites them.
"""
from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results"
DEFAULT_OUTPUT = REPO_ROOT / "runs" / "benchmarks"
# benchmarks/ sits beside flexar/ and is not part of the installed package
sys.path.insert(0, str(REPO_ROOT))

from benchmarks import BENCHMARKS, load  # noqa: E402


def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help=f"benchmark to run, one of: {', '.join(sorted(BENCHMARKS))}")
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    parser.add_argument("--quick", action="store_true", help="tiny sizes for smoke tests; nothing is written by default")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--record", action="store_true",
                        help="write the tracked benchmarks/results/NAME.json (and its plots) instead of runs/benchmarks/")
    parser.add_argument("--output", type=Path, default=None, help="default: runs/benchmarks/NAME.json")
    return parser, parser.parse_args(argv)


def output_path(name: str, quick: bool, record: bool, output: Path | None) -> Path | None:
    """Where the JSON record goes: `output`, else runs/benchmarks/NAME.json for a full run, benchmarks/results/ with
    `record`, nothing for a quick run. Raises ValueError for a combination that would record meaningless numbers."""
    if record and quick:
        raise ValueError("--record keeps full runs only: a --quick run's numbers mean nothing")
    if record and output is not None:
        raise ValueError("--record writes benchmarks/results/NAME.json; give either --record or --output")
    if output is not None:
        return output
    if quick:
        return None
    return (RESULTS if record else DEFAULT_OUTPUT) / f"{name}.json"


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ", ".join(_format(item) for item in value) + "]"
    return str(value)


def format_table(rows: list[dict]) -> str:
    columns: list[str] = []
    for row in rows:
        columns.extend(key for key in row if key not in columns)
    cells = [columns] + [[_format(row.get(column, "")) for column in columns] for row in rows]
    widths = [max(len(line[index]) for line in cells) for index in range(len(columns))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def format_report(record: dict) -> str:
    machine = record["machine"]
    lines = [
        f"benchmark {record['benchmark']}{' (quick)' if record['quick'] else ''} on {machine['device_name']} "
        f"({machine['device']}, {machine['threads']} threads, torch {machine['torch']}, {machine['date']}), "
        f"{record['wall_seconds']:.1f} s",
        "config: " + json.dumps(record["config"]),
        "summary: " + json.dumps(record["summary"], indent=2),
        "",
        format_table(record["rows"]),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser, args = parse_args(argv)
    if args.name not in BENCHMARKS:
        parser.error(f"unknown benchmark {args.name!r}; known benchmarks: {', '.join(sorted(BENCHMARKS))}")
    try:
        output = output_path(args.name, args.quick, args.record, args.output)
    except ValueError as error:
        parser.error(str(error))

    # torch loads only once the name is known, so that a mistyped name fails at once
    import torch

    from benchmarks.common import machine_info

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but torch sees no CUDA device")

    machine = machine_info(device)
    start = time.perf_counter()
    benchmark = load(args.name)
    extra = {}
    if "output_dir" in inspect.signature(benchmark.run).parameters:
        # a quick run's files go to a temporary folder inside the benchmark
        extra["output_dir"] = output.parent if output is not None else None
    results = benchmark.run(quick=args.quick, device=device, **extra)
    wall_seconds = time.perf_counter() - start
    record = {"benchmark": args.name, "quick": args.quick, "machine": machine, "wall_seconds": wall_seconds, **results}

    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(record, indent=2) + "\n")

    if args.json:
        print(json.dumps(record))
    else:
        print(format_report(record))
    if output is not None:
        print(f"wrote {output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

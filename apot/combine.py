"""One report over several sweeps: their trial records in one pair of tables (each cell the mean over every
seed the sweeps finished, with its ``n``), the plots and results files, and a "Made with" line per sweep.

    python -m apot.combine SWEEP [SWEEP ...] --out DIR [--update-readme README.md]

A SWEEP is an experiment folder (``<storage>/<name>``, or a copy such as ``results/<name>``): its
``results.json`` when present, else its ``records/`` (a sweep still running). Nothing is trained.

- A grid point (arch, bit, quantizer, seed) held by several sweeps is taken from the first one listed that
  finished it (else the first that has it); the report names each record it left out.
- The trials of one table cell must share one training setup (`apot.recipe.identity_changes`, grid point
  aside): sweeps that differ are refused in one line naming the cell and the setting, before anything is
  written.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from apot import provenance as code_provenance
from apot import report
from apot.config import GRID_KEYS
from apot.errors import exit_with_error
from apot.recipe import FP32_BIT, NOT_TRAIN_KEYS, identity_changes, quantizer_name


class CombineError(ValueError):
    """Sweeps that cannot be reported together (one line)."""


def point_of(record: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(record.get(k) for k in GRID_KEYS)


def point_label(point: tuple[Any, ...]) -> str:
    arch, bit, power, seed = point
    kind = "FP32" if bit == FP32_BIT else f"{bit}-bit {quantizer_name(power)}"
    return f"{arch} {kind} s{seed}"


def read_sweep(folder: Path) -> tuple[list[dict[str, Any]], dict[str, Any], list[dict[str, Any]]]:
    """(records, provenance, expected grid points) of one experiment folder; ``ReportError`` (one line) when
    it holds no readable results."""
    folder = Path(folder)
    if not folder.is_dir():
        raise report.ReportError(f"{folder}: no such sweep folder (an experiment folder, <storage>/<name>)")
    if (folder / report.RESULTS_JSON).exists():
        payload = report.read_results_payload(folder)
        return payload["records"], payload["provenance"], payload.get("expected") or []
    records, provenance = report.records_of(folder) if (folder / "records").is_dir() else ([], {})
    if not records:
        raise report.ReportError(f"{folder}: neither a results.json nor any trial record; is it a sweep "
                                 "folder (<storage>/<name>)?")
    return records, provenance, []


def merge(sweeps: list[tuple[str, list[dict[str, Any]], list[dict[str, Any]]]]
          ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, list[str]], dict[str, int]]:
    """Merge ``(name, records, expected)`` per sweep, in priority order.

    Returns (records, expected points, per sweep name the records of it left out, and the number used).
    Raises ``CombineError`` when the trials of one cell differ in their training setup."""
    chosen: dict[tuple[Any, ...], tuple[str, dict[str, Any]]] = {}
    left_out: dict[str, list[str]] = {name: [] for name, _, _ in sweeps}
    for name, records, _ in sweeps:
        for record in records:
            point = point_of(record)
            held = chosen.get(point)
            if held is None or (held[1].get("state") != "TERMINATED" and record.get("state") == "TERMINATED"):
                if held is not None:
                    left_out[held[0]].append(f"{point_label(point)} ({held[1].get('state')})")
                chosen[point] = (name, record)
            else:
                left_out[name].append(f"{point_label(point)} ({record.get('state')})")
    _check_one_setup_per_cell(chosen)
    expected: dict[tuple[Any, ...], dict[str, Any]] = {}
    for _, _, points in sweeps:
        for p in points:
            expected.setdefault(point_of(p), {k: p.get(k) for k in GRID_KEYS})
    for point in chosen:
        expected.setdefault(point, dict(zip(GRID_KEYS, point, strict=True)))
    used: dict[str, int] = {name: 0 for name, _, _ in sweeps}
    for name, _ in chosen.values():
        used[name] += 1
    return [record for _, record in chosen.values()], list(expected.values()), left_out, used


def _setup(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in (record.get("config") or {}).items() if k not in NOT_TRAIN_KEYS}


def _check_one_setup_per_cell(chosen: dict[tuple[Any, ...], tuple[str, dict[str, Any]]]) -> None:
    first: dict[tuple[Any, ...], tuple[str, dict[str, Any]]] = {}
    for (arch, bit, power, _), (name, record) in chosen.items():
        if not record.get("config"):
            continue
        cell = (arch, bit, None if bit == FP32_BIT else power)
        if cell not in first:
            first[cell] = (name, record)
            continue
        other_name, other = first[cell]
        changes = identity_changes(_setup(other), _setup(record))
        if changes:
            raise CombineError(
                f"{point_label(point_of(record))} of {name} and {point_label(point_of(other))} of "
                f"{other_name} share a table cell but not a training setup ({changes[0]}); combine sweeps "
                "of one setup, or list only one of them")


def combine(folders: list[Path], command: str
            ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """(records, expected points, provenance) of the sweeps in ``folders``, first listed first (see the
    module doc). The provenance holds each sweep's own under ``sweeps``."""
    read = []
    for folder in folders:
        records, prov, expected = read_sweep(Path(folder))
        read.append((Path(folder).name, records, expected, prov))
    names = [name for name, *_ in read]
    if len(set(names)) != len(names):
        raise CombineError(f"two sweeps have the same folder name ({', '.join(names)}); each must be named "
                           "once")
    records, expected, left_out, used = merge([(name, recs, exp) for name, recs, exp, _ in read])
    epochs = {r["config"].get("epochs") for r in records if r.get("config")}
    seeds = sorted({r.get("seed") for r in records if r.get("seed") is not None}, key=str)
    provenance: dict[str, Any] = {
        "epochs": epochs.pop() if len(epochs) == 1 else None,
        "seeds": seeds,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "sweeps": [{"name": name, "trials": used[name], "left_out": left_out[name], "provenance": prov}
                   for name, _, _, prov in read],
        "code": code_provenance.collect()["code"],  # the code that combined them; each sweep names its own
        "command": command,
    }
    return records, expected, provenance


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m apot.combine", description=__doc__.split("\n\n")[0])
    p.add_argument("sweeps", nargs="+", type=Path, help="experiment folders, in priority order")
    p.add_argument("--out", required=True, type=Path,
                   help="folder for results.json/.csv, tables.md and the PNGs (not one of the sweeps)")
    p.add_argument("--update-readme", type=Path, default=None, metavar="README",
                   help="write the combined tables between the README's apot:results markers")
    args = p.parse_args(argv)
    out = args.out.resolve()
    if any(out == folder.resolve() for folder in args.sweeps):
        return exit_with_error(f"--out {args.out} is one of the sweeps; write the combined report elsewhere")
    try:
        if args.update_readme is not None:
            report.check_readme(args.update_readme)
        command = shlex.join(["python", "-m", "apot.combine", *(sys.argv[1:] if argv is None else argv)])
        records, expected, prov = combine(args.sweeps, command)
        paths = report.write_results(records, out, prov, expected=expected)
        tables = paths[report.TABLES_MD].read_text()
        if args.update_readme is not None:
            report.update_readme(args.update_readme, tables, prov)
    except (report.ReportError, CombineError) as exc:
        return exit_with_error(str(exc))
    print(tables)
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

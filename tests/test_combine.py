"""apot.combine: one report over several sweep folders (records written as a sweep writes them)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from apot import report
from apot.checkpoint import write_json
from apot.combine import CombineError, combine, main
from apot.recipe import TrainConfig
from apot.train import summarize

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 3


def record(arch: str, bit: int, power: bool, seed: int, acc: float, state: str = "TERMINATED",
           **train: Any) -> dict[str, Any]:
    """A record as the sweep's rank 0 writes it: ``summarize`` of a history; ``acc`` the final accuracy."""
    cfg = TrainConfig(arch=arch, bit=bit, power=power, seed=seed, epochs=EPOCHS, **train)
    done = EPOCHS if state == "TERMINATED" else 1
    history = [{"epoch": e, "test_acc": acc - (done - e) * 0.1, "train_acc": 98.0, "epoch_s": 2.0}
               for e in range(1, done + 1)]
    out = summarize(cfg, history)
    out["state"] = state
    return out


def sweep(folder: Path, records: list[dict[str, Any]], provenance: dict[str, Any] | None,
          expected: list[dict[str, Any]] | None = None) -> Path:
    """An experiment folder: records/<trial>.json, and results.json when ``provenance`` is given (a sweep
    that ended); without it, a sweep still running."""
    from apot.sweep import record_path

    for r in records:
        path = record_path(folder, r)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(r, path)
    if provenance is not None:
        report.write_results(records, folder, provenance, expected=expected)
    return folder


def rows(md: str, heading: str) -> dict[str, str]:
    """{"ResNet-18 2-bit": accuracy cell} of the table under ``heading``."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    first = next(i for i in range(start, len(lines)) if lines[i].startswith("|"))  # the header row
    out = {}
    for line in lines[first + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        out[f"{cells[0]} {cells[1]}"] = cells[3]
    return out


def prov(seeds: list[int], commit: str) -> dict[str, Any]:
    return {"epochs": EPOCHS, "seeds": seeds, "code": f"apot 0.1.0, git {commit}", "hardware": "test CPU",
            "date": "2026-12-01 10:00 UTC", "command": f"python tune_sweep.py --set name=s{commit}"}


def test_cells_average_the_seeds_of_every_sweep_and_say_their_n(tmp_path: Path) -> None:
    first = sweep(tmp_path / "r18_s0", [record("resnet18", 32, True, 0, 99.30),
                                        record("resnet18", 2, True, 0, 99.00),
                                        record("resnet18", 2, False, 0, 98.90)], prov([0], "aaa"))
    seeds12 = [record("resnet18", 2, True, s, a) for s, a in ((1, 99.20), (2, 99.10))]
    second = sweep(tmp_path / "r18_s12", seeds12, prov([1, 2], "bbb"),
                   expected=[{"arch": "resnet18", "bit": 2, "power": p, "seed": s} for p in (True, False)
                             for s in (1, 2)])
    records, expected, provenance = combine([first, second], "python -m apot.combine r18_s0 r18_s12")
    assert len(records) == 5 and len(expected) == 7
    md = report.markdown_tables(records, provenance, expected)
    assert rows(md, "### APoT") == {"ResNet-18 FP32": "99.30 (n=1)", "ResNet-18 2-bit": "99.10 ± 0.10 (n=3)"}
    assert rows(md, "### Uniform") == {"ResNet-18 FP32": "99.30 (n=1)",
                                       "ResNet-18 2-bit": "98.90 (n=1; 2 of 3 missing)"}
    block = report.provenance_block(provenance)
    assert "Made with: 3 epochs; seeds 0, 1, 2;" in block and "2 sweeps combined" in block
    assert "- `r18_s0`, 3 trials used: 3 epochs; seeds 0; hardware test CPU;" in block
    assert "- `r18_s12`, 2 trials used:" in block and "git bbb" in block
    assert "Left out" not in block


def test_a_point_in_two_sweeps_comes_from_the_first_listed_that_finished_it(tmp_path: Path) -> None:
    a = sweep(tmp_path / "a", [record("resnet18", 4, True, 0, 99.40),
                               record("resnet18", 4, False, 0, 97.00, state="INCOMPLETE")], prov([0], "aaa"))
    b = sweep(tmp_path / "b", [record("resnet18", 4, True, 0, 99.10), record("resnet18", 4, False, 0, 99.20)],
              prov([0], "bbb"))
    records, _, provenance = combine([a, b], "cmd")
    used = {(r["power"], r["final_test_acc"]) for r in records}
    assert used == {(True, 99.40), (False, 99.20)}  # a's finished APoT, b's finished uniform
    sweeps = {s["name"]: s for s in provenance["sweeps"]}
    assert sweeps["a"]["trials"] == 1 and sweeps["b"]["trials"] == 1
    assert sweeps["a"]["left_out"] == ["resnet18 4-bit uniform s0 (INCOMPLETE)"]
    assert sweeps["b"]["left_out"] == ["resnet18 4-bit apot s0 (TERMINATED)"]
    assert "Left out of `b` (a sweep listed before it holds the point): resnet18 4-bit apot s0" in (
        report.provenance_block(provenance))


def test_sweeps_of_another_training_setup_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    a = sweep(tmp_path / "a", [record("resnet18", 2, True, 0, 99.0)], prov([0], "aaa"))
    b = sweep(tmp_path / "b", [record("resnet18", 2, True, 1, 99.1, lr=0.1)], prov([1], "bbb"))
    with pytest.raises(CombineError, match=r"^resnet18 2-bit apot s1 of b and resnet18 2-bit apot s0 of a "
                                           r"share a table cell but not a training setup "
                                           r"\(lr=0.01 \(this run: 0.1\)\)"):
        combine([a, b], "cmd")
    out = tmp_path / "out"
    assert main([str(a), str(b), "--out", str(out)]) == 2
    assert not out.exists()


def test_cli_writes_the_report_and_the_readme_block_from_a_finished_and_a_running_sweep(
        tmp_path: Path) -> None:
    done = sweep(tmp_path / "done", [record("resnet34", 32, True, 0, 99.4),
                                     record("resnet34", 5, True, 0, 99.3)], prov([0], "aaa"))
    running = sweep(tmp_path / "running", [record("resnet34", 5, True, 1, 99.5),
                                           record("resnet34", 5, False, 1, 99.0, state="RUNNING")], None)
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{report.README_START}\nold\n{report.README_END}\ntail\n")
    out = tmp_path / "combined"
    run = subprocess.run([sys.executable, "-m", "apot.combine", str(done), str(running), "--out", str(out),
                          "--update-readme", str(readme)], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr
    records, provenance = report.read_results(out)
    assert len(records) == 4 and [s["name"] for s in provenance["sweeps"]] == ["done", "running"]
    assert (out / "tables.md").read_text() in run.stdout
    text = readme.read_text()
    assert "old" not in text and text.endswith(f"{report.README_END}\ntail\n")
    assert "| ResNet-34 | 5-bit | batch128_lr0.01_wd0.0001_3epoch | 99.40 ± 0.14 (n=2) |" in text
    assert "| ResNet-34 | 5-bit | batch128_lr0.01_wd0.0001_3epoch | running | — |" in text
    assert f"Command: `python -m apot.combine {done} {running} --out {out} --update-readme {readme}`" in text
    assert json.loads((out / "results.json").read_text())["expected"]  # the MISSING placeholders' source


@pytest.mark.parametrize("case", ["missing", "empty", "out_is_a_sweep"])
def test_bad_folders_are_one_line_errors(tmp_path: Path, case: str, capsys) -> None:
    a = sweep(tmp_path / "a", [record("resnet18", 2, True, 0, 99.0)], prov([0], "aaa"))
    (tmp_path / "empty").mkdir()
    args = {"missing": [str(a), str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
            "empty": [str(a), str(tmp_path / "empty"), "--out", str(tmp_path / "o")],
            "out_is_a_sweep": [str(a), "--out", str(a)]}[case]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert {"missing": "nope: no such sweep folder",
            "empty": "empty: neither a results.json nor any trial record",
            "out_is_a_sweep": "is one of the sweeps"}[case] in err

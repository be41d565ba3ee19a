"""apot.report: tables, CSV, PNG, results.json round trip, README markers. Hand-built records, no training."""

from __future__ import annotations

import csv
import json
import re
import statistics
from pathlib import Path
from typing import Any

import pytest

from apot import report
from apot.report import (
    ReportError,
    hyper_params_cell,
    load_results,
    markdown_tables,
    model_name,
    precision_cell,
    read_results,
    update_readme,
    write_results,
)

SEED_CONFIG = {"epochs": 25, "batch_size": 128, "lr": 0.01, "weight_decay": 1e-4, "schedule": "cosine",
               "momentum": 0.9, "width": 16, "train_subset": None}
FAST_CONFIG = {**SEED_CONFIG, "epochs": 3, "batch_size": 64, "lr": 0.05, "weight_decay": 5e-4}
PROVENANCE = {"quick": False, "epochs": 25, "train_subset": None, "seeds": [0, 1, 2],
              "hardware": "1 node(s), 2 CPUs (test CPU)", "date": "2025-01-02 03:04 UTC",
              "command": "python tune_sweep.py", "torch": "2.4.0", "ray": "2.49.0", "wall_time_s": 3723.0}
QUICK = {**PROVENANCE, "quick": True, "epochs": 2, "train_subset": 4096,
         "command": "python tune_sweep.py --quick"}


def rec(arch: str, bit: int, power: bool, seed: int, acc: float | None, state: str = "TERMINATED",
        config: dict[str, Any] | None = None) -> dict[str, Any]:
    """A trial record as apot.train.summarize writes it (+ state/error as the sweep sets them)."""
    config = {**(config or SEED_CONFIG), "arch": arch, "bit": bit, "power": power, "seed": seed}
    done = state == "TERMINATED"
    # A failed/running trial still carries partial numbers: the tables must never show them.
    partial = 12.34
    return {
        "arch": arch, "bit": bit, "power": power, "seed": seed, "config": config, "state": state,
        "final_test_acc": acc if done else None,
        "best_test_acc": acc if done else partial, "best_epoch": 2 if done else 1,
        "final_train_acc": 99.9 if done else partial,
        "epochs_done": config["epochs"] if done else 1, "wall_time_s": 10.5,
        "error": "RuntimeError: CUDA out of memory" if state == "ERROR" else None,
        "history": [{"epoch": 1, "epochs": config["epochs"], "test_acc": acc if done else partial}],
    }


# resnet18: one seed everywhere; resnet34 4-bit: three seeds each; resnet50 2-bit uniform failed;
# resnet50 3-bit APoT: 3 seeds, one failed; a non-default config on resnet18 3-bit; resnet50 5-bit uniform
# seed 0 exists in the expected grid only (missing).
APOT34 = [99.41, 99.47, 99.38]
UNI34 = [99.30, 99.36, 99.29]
RECORDS = [
    rec("resnet50", 2, True, 0, 98.76),
    rec("resnet50", 2, False, 0, None, state="ERROR"),
    rec("resnet18", 5, True, 0, 99.52),
    rec("resnet18", 5, False, 0, 99.40),
    rec("resnet18", 4, True, 0, 99.5),
    rec("resnet18", 4, False, 0, 99.5),
    rec("resnet18", 3, True, 0, 99.10, config=FAST_CONFIG),
    rec("resnet18", 3, False, 0, 99.35, config=FAST_CONFIG),
    *[rec("resnet34", 4, True, s, a) for s, a in enumerate(APOT34)],
    *[rec("resnet34", 4, False, s, a) for s, a in enumerate(UNI34)],
    rec("resnet50", 3, True, 0, 99.20),
    rec("resnet50", 3, True, 1, None, state="ERROR"),
    rec("resnet50", 3, True, 2, 99.30),
    rec("resnet50", 3, False, 0, None, state="RUNNING"),
    rec("resnet50", 5, True, 0, 99.60),
]
EXPECTED = [{"arch": r["arch"], "bit": r["bit"], "power": r["power"], "seed": r["seed"]} for r in RECORDS]
EXPECTED.append({"arch": "resnet50", "bit": 5, "power": False, "seed": 0})


def lines_of(md: str) -> list[str]:
    return md.splitlines()


def table(md: str, heading_start: str) -> list[str]:
    """The table rows (without header/separator) under the heading that starts with ``heading_start``."""
    lines = lines_of(md)
    start = next(i for i, line in enumerate(lines) if line.startswith(heading_start))
    rows = []
    for line in lines[start + 1:]:
        if line.startswith("###"):
            break
        if line.startswith("|"):
            rows.append(line)
    return rows[2:]


def sign(x: float) -> str:
    x = round(x, 2) + 0.0
    return f"{x:+.2f}"


# ------------------------------------------------------------------------------------------ helpers
@pytest.mark.parametrize(("arch", "name"), [("resnet18", "ResNet-18"), ("resnet34", "ResNet-34"),
                                            ("resnet50", "ResNet-50"), ("resnet101", "ResNet-101"),
                                            ("vgg16", "Vgg-16"), ("mlp", "mlp")])
def test_model_name(arch: str, name: str) -> None:
    assert model_name(arch) == name


def test_precision_and_hyper_params_cells() -> None:
    assert [precision_cell(b) for b in (5, 4, 3, 2, 32)] == ["5-bit", "4-bit", "3-bit", "2-bit", "FP32"]
    assert hyper_params_cell(SEED_CONFIG) == "batch128_lr0.01_wd0.0001_25epoch"
    assert hyper_params_cell(FAST_CONFIG) == "batch64_lr0.05_wd0.0005_3epoch"
    assert hyper_params_cell({"batch_size": 256, "lr": 0.1, "weight_decay": 0.0, "epochs": 90}) == (
        "batch256_lr0.1_wd0_90epoch")


# ------------------------------------------------------------------------------------------ tables
def test_apot_table_rows_exact() -> None:
    """Beside cells that average several seeds every cell says its n, one seed included."""
    md = markdown_tables(RECORDS, PROVENANCE, expected=EXPECTED)
    mean, std = statistics.fmean(APOT34), statistics.stdev(APOT34)
    m50, s50 = statistics.fmean([99.20, 99.30]), statistics.stdev([99.20, 99.30])
    assert table(md, "### APoT") == [
        "| ResNet-18 | 5-bit | batch128_lr0.01_wd0.0001_25epoch | 99.52 (n=1) |",
        "| ResNet-18 | 4-bit | batch128_lr0.01_wd0.0001_25epoch | 99.50 (n=1) |",
        "| ResNet-18 | 3-bit | batch64_lr0.05_wd0.0005_3epoch | 99.10 (n=1) |",
        f"| ResNet-34 | 4-bit | batch128_lr0.01_wd0.0001_25epoch | {mean:.2f} ± {std:.2f} (n=3) |",
        "| ResNet-50 | 5-bit | batch128_lr0.01_wd0.0001_25epoch | 99.60 (n=1) |",
        f"| ResNet-50 | 3-bit | batch128_lr0.01_wd0.0001_25epoch | {m50:.2f} ± {s50:.2f} "
        "(n=2; 1 of 3 failed) |",
        "| ResNet-50 | 2-bit | batch128_lr0.01_wd0.0001_25epoch | 98.76 (n=1) |",
    ]
    assert "| ResNet-34 | 4-bit | batch128_lr0.01_wd0.0001_25epoch | 99.42 ± 0.05 (n=3) |" in md  # by hand
    assert "| Model | Precision | Hyper-Params | Accuracy |" in lines_of(md)


def test_uniform_table_rows_and_delta() -> None:
    md = markdown_tables(RECORDS, PROVENANCE, expected=EXPECTED)
    d34 = round(statistics.fmean(UNI34), 2) - round(statistics.fmean(APOT34), 2)
    m, s = statistics.fmean(UNI34), statistics.stdev(UNI34)
    assert table(md, "### Uniform") == [
        f"| ResNet-18 | 5-bit | batch128_lr0.01_wd0.0001_25epoch | 99.40 (n=1) | {sign(99.40 - 99.52)} |",
        "| ResNet-18 | 4-bit | batch128_lr0.01_wd0.0001_25epoch | 99.50 (n=1) | +0.00 |",
        f"| ResNet-18 | 3-bit | batch64_lr0.05_wd0.0005_3epoch | 99.35 (n=1) | {sign(99.35 - 99.10)} |",
        f"| ResNet-34 | 4-bit | batch128_lr0.01_wd0.0001_25epoch | {m:.2f} ± {s:.2f} (n=3) | {sign(d34)} |",
        "| ResNet-50 | 5-bit | — | missing | — |",
        "| ResNet-50 | 3-bit | batch128_lr0.01_wd0.0001_25epoch | running | — |",
        "| ResNet-50 | 2-bit | batch128_lr0.01_wd0.0001_25epoch | failed | — |",
    ]
    assert sign(99.40 - 99.52) == "-0.12" and sign(99.35 - 99.10) == "+0.25" and sign(d34) == "-0.10"
    assert "| Model | Precision | Hyper-Params | Accuracy | Compared with APoT |" in lines_of(md)


def test_failed_and_missing_never_show_numbers() -> None:
    md = markdown_tables(RECORDS, PROVENANCE, expected=EXPECTED)
    assert "12.34" not in md  # the partial numbers every unfinished record carries
    unfinished = []
    for heading, width in (("### APoT", 4), ("### Uniform", 5)):
        for row in table(md, heading):
            cells = [c.strip() for c in row.strip("|").split("|")]
            assert len(cells) == width, row
            if cells[3] in ("failed", "missing", "running"):
                unfinished.append((heading, cells[1], cells[3]))
                assert width == 4 or cells[4] == "—", row  # no delta against a trial with no result
    assert sorted(unfinished) == [("### Uniform", "2-bit", "failed"), ("### Uniform", "3-bit", "running"),
                                  ("### Uniform", "5-bit", "missing")]
    # an APoT partner that failed gives its uniform row no delta either
    pair = [rec("resnet18", 4, True, 0, None, state="ERROR"), rec("resnet18", 4, False, 0, 99.3)]
    md = markdown_tables(pair, PROVENANCE)
    hyper = "batch128_lr0.01_wd0.0001_25epoch"
    assert table(md, "### APoT") == [f"| ResNet-18 | 4-bit | {hyper} | failed |"]
    assert table(md, "### Uniform") == [f"| ResNet-18 | 4-bit | {hyper} | 99.30 | — |"]


def test_final_epoch_never_best_and_delta_from_the_shown_numbers() -> None:
    late_drop = rec("resnet18", 4, True, 0, 99.21)  # its best epoch (17) beats its last (25)
    late_drop.update(best_test_acc=99.48, best_epoch=17, history=[
        {"epoch": 17, "epochs": 25, "test_acc": 99.48}, {"epoch": 25, "epochs": 25, "test_acc": 99.21}])
    records = [late_drop, rec("resnet18", 4, False, 0, 99.30),
               # shown 99.00 and 99.13: the delta of the shown numbers is +0.13, of the raw ones +0.12
               rec("resnet34", 4, True, 0, 99.004), rec("resnet34", 4, False, 0, 99.126)]
    md = markdown_tables(records, PROVENANCE)
    assert table(md, "### APoT") == ["| ResNet-18 | 4-bit | batch128_lr0.01_wd0.0001_25epoch | 99.21 |",
                                     "| ResNet-34 | 4-bit | batch128_lr0.01_wd0.0001_25epoch | 99.00 |"]
    assert table(md, "### Uniform") == [
        "| ResNet-18 | 4-bit | batch128_lr0.01_wd0.0001_25epoch | 99.30 | +0.09 |",  # best would give -0.18
        "| ResNet-34 | 4-bit | batch128_lr0.01_wd0.0001_25epoch | 99.13 | +0.13 |",  # raw would give +0.12
    ]
    assert "99.48" not in md
    first = next(csv.DictReader(report.csv_text(records).splitlines()))
    assert (float(first["final_test_acc"]), float(first["best_test_acc"]), first["best_epoch"]) == \
        (99.21, 99.48, "17")  # the best epoch is kept in the CSV, never used in the tables


def test_without_expected_there_is_no_missing_row() -> None:
    md = markdown_tables(RECORDS, PROVENANCE)
    assert "missing" not in md
    assert not any(row.startswith("| ResNet-50 | 5-bit") for row in table(md, "### Uniform"))


def test_mixed_unfinished_cell_and_empty_cell() -> None:
    cell = report.accuracy_cell([rec("resnet18", 2, True, 0, None, "ERROR"),
                                 rec("resnet18", 2, True, 1, None, "PENDING"),
                                 rec("resnet18", 2, True, 2, None, "PENDING")])
    assert cell == "1 failed, 2 pending"
    assert report.accuracy_cell([]) == "missing"
    no_acc = {**rec("resnet18", 2, True, 0, 99.0), "final_test_acc": None}
    assert report.accuracy_cell([no_acc]) == "no result"


def test_fp32_row_first_and_distinct_configs_listed() -> None:
    records = [rec("resnet18", 32, True, 0, 99.6), rec("resnet18", 4, True, 0, 99.4),
               rec("resnet18", 4, True, 1, 99.5, config=FAST_CONFIG)]
    rows = table(markdown_tables(records, PROVENANCE), "### APoT")
    assert rows[0].startswith("| ResNet-18 | FP32 |")
    assert "batch128_lr0.01_wd0.0001_25epoch<br>batch64_lr0.05_wd0.0005_3epoch" in rows[1]


def test_provenance_and_accuracy_statement() -> None:
    md = markdown_tables(RECORDS, PROVENANCE, expected=EXPECTED)
    assert "Accuracy: final-epoch top-1 on the 10k MNIST test split" in md
    for text in ("25 epochs", "seeds 0, 1, 2", "1 node(s), 2 CPUs (test CPU)", "2025-01-02 03:04 UTC",
                 "`python tune_sweep.py`", "ray 2.49.0", "torch 2.4.0", "wall time 1h 02m 03s"):
        assert text in md
    assert "quick" not in md.lower()


def test_quick_marker_on_every_table() -> None:
    md = markdown_tables(RECORDS, QUICK, expected=EXPECTED)
    marker = "(quick run: 2 epochs on 4096 training images — not comparable to the paper)"
    assert f"### APoT (power=True) {marker}" in md
    assert f"### Uniform (power=False) {marker}" in md
    assert "QUICK RUN" in md


# ------------------------------------------------------------------------------------------ files
@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_results(RECORDS, tmp_path_factory.mktemp("results"), QUICK, expected=EXPECTED)


def test_write_results_paths(written: dict[str, Path]) -> None:
    assert set(written) == {"results.json", "results.csv", "tables.md", "accuracy_vs_bits.png",
                            "learning_curves.png"}
    assert all(p.is_file() for p in written.values())
    assert written["tables.md"].read_text() == markdown_tables(RECORDS, QUICK, expected=EXPECTED)
    assert not list(written["tables.md"].parent.glob("*.tmp"))  # no temp file left behind


def test_csv_rows(written: dict[str, Path]) -> None:
    with written["results.csv"].open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames or ()) == report.CSV_COLUMNS
    assert report.CSV_COLUMNS == (
        "arch", "bit", "quantizer", "seed", "state", "final_test_acc", "best_test_acc", "best_epoch",
        "final_train_acc", "epochs_done", "epochs", "wall_time_s", "batch_size", "lr", "weight_decay",
        "schedule", "size_kb", "compression", "error")
    assert len(rows) == len(RECORDS)
    for row, r in zip(rows, RECORDS, strict=True):
        assert row["arch"] == r["arch"] and int(row["bit"]) == r["bit"] and int(row["seed"]) == r["seed"]
        assert row["quantizer"] == ("apot" if r["power"] else "uniform")
        assert row["state"] == r["state"]
        assert int(row["epochs"]) == r["config"]["epochs"]
        assert int(row["batch_size"]) == r["config"]["batch_size"]
        assert float(row["lr"]) == r["config"]["lr"]
        assert float(row["weight_decay"]) == r["config"]["weight_decay"]
        assert row["schedule"] == "cosine"
        if r["state"] == "TERMINATED":
            assert float(row["final_test_acc"]) == r["final_test_acc"] and row["error"] == ""
        else:
            assert row["final_test_acc"] == ""
    failed = [row for row in rows if row["state"] == "ERROR"]
    assert failed and all(row["error"] == "RuntimeError: CUDA out of memory" for row in failed)


def test_png_is_valid(written: dict[str, Path]) -> None:
    data = written["accuracy_vs_bits.png"].read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000


def test_png_without_finished_trials(tmp_path: Path) -> None:
    paths = write_results([rec("resnet18", 4, True, 0, None, "ERROR")], tmp_path, PROVENANCE)
    assert paths["accuracy_vs_bits.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    paths = write_results([], tmp_path, PROVENANCE)
    assert paths["accuracy_vs_bits.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_read_results_round_trip(written: dict[str, Path]) -> None:
    records, prov = read_results(written["results.json"].parent)
    assert records == RECORDS
    assert prov == QUICK
    assert json.loads(written["results.json"].read_text())["expected"] == EXPECTED


def test_read_results_errors(tmp_path: Path) -> None:
    cases = [
        (None, r"results\.json: no results file"),
        ("{not json", r"results\.json: cannot read results \(JSONDecodeError"),
        (json.dumps([1, 2]), "not an apot results file"),
        (json.dumps({"records": []}), "not an apot results file"),
        (json.dumps({"provenance": {}, "records": [{"arch": "resnet18"}]}),
         r"record 0 is not a trial record \(missing bit, power, state\)"),
    ]
    for content, message in cases:
        if content is not None:
            (tmp_path / "results.json").write_text(content)
        for reader in (read_results, load_results):
            with pytest.raises(ReportError, match=message) as info:
                reader(tmp_path)
            assert "\n" not in str(info.value)


def test_failed_write_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_results(RECORDS[:2], tmp_path, PROVENANCE)
    before = (tmp_path / "results.json").read_bytes()

    def boom(*args: Any, **kwargs: Any) -> bytes:
        raise RuntimeError("plot failed")

    monkeypatch.setattr(report, "plot_accuracy_vs_bits", boom)
    with pytest.raises(RuntimeError, match="plot failed"):
        write_results(RECORDS, tmp_path, PROVENANCE)
    assert (tmp_path / "results.json").read_bytes() == before


# ------------------------------------------------------------------------------------------ README
README = (
    "# apot\r\n\nIntro text — unicode kept.\n\n## Results\n\n"
    f"{report.README_START}\nold tables\nold line 2\n{report.README_END}\n\n## After\ntrailing text"
)


def test_update_readme_replaces_only_between_markers(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_bytes(README.encode())
    tables = markdown_tables(RECORDS, PROVENANCE, expected=EXPECTED)
    update_readme(readme, tables, PROVENANCE)
    new = readme.read_bytes().decode()
    head, tail = README.split(report.README_START)[0], README.split(report.README_END)[1]
    assert new.startswith(head + report.README_START + "\n")
    assert new.endswith(report.README_END + tail)
    inside = new[len(head) + len(report.README_START):-len(report.README_END + tail)]
    assert "old tables" not in inside
    assert tables.strip() in inside
    assert inside.count("Made with:") == 1  # provenance already in the tables: not repeated
    # Idempotent: a second update gives the same bytes.
    update_readme(readme, tables, PROVENANCE)
    assert readme.read_bytes().decode() == new


def test_update_readme_adds_provenance_to_bare_tables(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(README)
    update_readme(readme, "| a | b |\n|---|---|\n", QUICK)
    text = readme.read_text()
    for fact in ("2 epochs", "seeds 0, 1, 2", "1 node(s), 2 CPUs", "2025-01-02 03:04 UTC",
                 "`python tune_sweep.py --quick`", "QUICK RUN"):
        assert fact in text


@pytest.mark.parametrize("body", [
    "# apot\nno markers here\n",
    f"# apot\n{report.README_START}\nonly a start\n",
    f"# apot\n{report.README_END}\n{report.README_START}\n",
    f"{report.README_START}\n{report.README_END}\n{report.README_START}\n{report.README_END}\n",
])
def test_update_readme_without_markers_errors(tmp_path: Path, body: str) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(body)
    with pytest.raises(ReportError, match=re.escape(report.README_START)) as info:
        update_readme(readme, "tables", PROVENANCE)
    assert "\n" not in str(info.value)
    assert readme.read_text() == body  # untouched


def test_update_readme_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="no such file"):
        update_readme(tmp_path / "README.md", "tables", PROVENANCE)


# ------------------------------------------------------------------------------------------ provenance line
def test_made_with_line_shows_code_python_and_gpus() -> None:
    code = {"code": "apot 0.1.0, git 1a2b3c4d5e6f (uncommitted changes)",
            "git_commit": "1a2b3c4d5e6f" + "0" * 28, "git_dirty": True, "python": "3.11.7",
            "gpu_model": "NVIDIA H100 80GB HBM3", "gpu_count": 8}
    block = report.provenance_block({**PROVENANCE, **code})
    made_with = block.split("Made with: ", 1)[1].split("\n", 1)[0]
    for text in ("code apot 0.1.0, git 1a2b3c4d5e6f (uncommitted changes)", "python 3.11.7",
                 "GPUs 8 x NVIDIA H100 80GB HBM3", "ray 2.49.0", "torch 2.4.0"):
        assert text in made_with
    assert "git_commit" not in block and "0" * 28 not in block  # the full hash is for programs, not the line
    assert "GPUs none" in report.provenance_block({**PROVENANCE, **code, "gpu_count": 0})


# ------------------------------------------------------------------------------------------ load_results
def test_load_results_is_results_csv_as_a_dataframe(written: dict[str, Path]) -> None:
    import pandas as pd

    folder = written["results.json"].parent
    df = load_results(folder)
    assert isinstance(df, pd.DataFrame) and len(df) == len(RECORDS)
    assert list(df.columns) == list(report.CSV_COLUMNS)
    # every row is its record (in order), typed as numbers where the record has numbers
    for row, r in zip(df.to_dict("records"), RECORDS, strict=True):
        keys = ("arch", "bit", "seed", "state")
        assert [row[k] for k in keys] == [r[k] for k in keys]
        assert row["quantizer"] == ("apot" if r["power"] else "uniform")
        assert row["epochs"] == r["config"]["epochs"] and row["lr"] == r["config"]["lr"]
        for key in ("final_test_acc", "best_test_acc", "final_train_acc", "wall_time_s"):
            assert (pd.isna(row[key]) if r[key] is None else row[key] == r[key]), (key, row[key], r[key])
    assert df.attrs["provenance"] == QUICK
    assert df["final_test_acc"].tolist()[2] == 99.52 and pd.isna(df["final_test_acc"].tolist()[1])
    assert (df["quantizer"] == "apot").sum() == sum(r["power"] for r in RECORDS)
    pd.testing.assert_frame_equal(load_results(written["results.json"]), df)  # the file itself works too


def test_load_results_mid_sweep_reads_records(tmp_path: Path) -> None:
    (tmp_path / "records").mkdir()
    for r in RECORDS[:3]:
        (tmp_path / "records" / f"{r['arch']}_b{r['bit']}_{r['power']}.json").write_text(json.dumps(r))
    df = load_results(tmp_path)
    assert sorted(df["final_test_acc"].dropna()) == [98.76, 99.52] and df.attrs["provenance"] == {}
    (tmp_path / "records" / "broken.json").write_text("{")
    with pytest.raises(ReportError, match=r"broken\.json: cannot read trial record"):
        load_results(tmp_path)


def test_load_history_one_row_per_epoch(tmp_path: Path) -> None:
    records = [curve_rec("resnet18", 4, True, [50.0, 90.0, 99.0]),
               curve_rec("resnet18", 2, False, [30.0, 60.0])]
    write_results(records, tmp_path, PROVENANCE)
    df = report.load_history(tmp_path)
    assert len(df) == 5
    assert df[["bit", "quantizer", "epoch", "test_acc"]].values.tolist() == [
        [4, "apot", 1, 50.0], [4, "apot", 2, 90.0], [4, "apot", 3, 99.0], [2, "uniform", 1, 30.0],
        [2, "uniform", 2, 60.0]]


# ------------------------------------------------------------------------------------------ learning curves
def curve_rec(arch: str, bit: int, power: bool, accs: list[float], seed: int = 0,
              state: str = "TERMINATED") -> dict[str, Any]:
    r = rec(arch, bit, power, seed, accs[-1] if state == "TERMINATED" else None, state=state)
    r["history"] = [{"epoch": i + 1, "epochs": 3, "test_acc": a} for i, a in enumerate(accs)]
    return r


def test_learning_curves_one_line_per_trial_styled_by_quantizer_and_bits() -> None:
    from matplotlib.colors import to_hex

    records = [
        curve_rec("resnet34", 4, True, [90.0, 98.0, 99.4]),
        curve_rec("resnet18", 4, True, [91.0, 98.5, 99.5], seed=0),
        curve_rec("resnet18", 4, True, [92.0, 98.6, 99.6], seed=1),
        curve_rec("resnet18", 4, False, [89.0, 97.0, 99.3]),
        curve_rec("resnet18", 2, True, [40.0, 80.0, 100.0]),
        curve_rec("resnet18", 2, False, [30.0, 70.0], state="ERROR"),  # failed after 2 epochs: drawn so far
        rec("resnet18", 3, True, 0, None, state="PENDING") | {"history": []},  # nothing to draw
    ]
    fig = report.learning_curves_figure(records, PROVENANCE)
    axes = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in axes] == ["ResNet-18", "ResNet-34"]
    r18 = axes[0].get_lines()
    assert len(r18) == 5 and len(axes[1].get_lines()) == 1
    drawn = sorted((tuple(line.get_xdata()), tuple(line.get_ydata()), to_hex(line.get_color()),
                    line.get_linestyle()) for line in r18)
    blue, orange, red = to_hex("tab:blue"), to_hex("tab:orange"), to_hex("tab:red")
    assert blue not in {d[2] for d in drawn}  # 5-bit's colour: no 5-bit trial here
    assert drawn == sorted([
        ((1, 2, 3), (91.0, 98.5, 99.5), orange, "-"),
        ((1, 2, 3), (92.0, 98.6, 99.6), orange, "-"),
        ((1, 2, 3), (89.0, 97.0, 99.3), orange, "--"),
        ((1, 2, 3), (40.0, 80.0, 100.0 - report.MIN_ERROR), red, "-"),  # 100% drawn at 99.99 (log scale)
        ((1, 2), (30.0, 70.0), red, "--"),
    ])
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["APoT 4-bit", "APoT 2-bit", "uniform 4-bit",
                                                          "uniform 2-bit"]
    bottom, top = axes[0].get_ylim()
    assert bottom <= 30.0 and 99.99 <= top < 100.0


def test_learning_curves_png_without_history(tmp_path: Path) -> None:
    data = report.plot_learning_curves([rec("resnet18", 4, True, 0, None, "PENDING") | {"history": []}],
                                       QUICK)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"

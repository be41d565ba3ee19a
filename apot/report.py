"""Results of a sweep: results.json / results.csv, the APoT and uniform Markdown tables, the accuracy plot,
the learning curves, the README tables between markers, and reading results back (``load_results``: a
pandas DataFrame).

Every function here is a pure function of a list of trial records (docs/ARCHITECTURE.md) plus a
``provenance`` dict (how the numbers were made: ``quick``, ``epochs``, ``train_subset``, ``seeds``,
``hardware``, ``date``, ``command``, ``ray``, ``torch``, ``wall_time_s``, and ``apot.provenance.collect``'s
keys: ``code``, ``git_commit``, ``git_dirty``, ``python``, ``gpu_model``, ``gpu_count``). No Ray, no torch.

The table number is always the mean over seeds of ``final_test_acc``: final-epoch top-1 (percent) on the
10k MNIST test split. A trial that did not finish never contributes a number; its cell says why (``failed``,
``running``, ``pending``, ``incomplete``, ``missing``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from apot.atomic import atomic_write_bytes
from apot.recipe import FP32_BIT, quantizer_name, removed_settings_used

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

__all__ = [
    "CSV_COLUMNS",
    "README_END",
    "README_START",
    "ReportError",
    "accuracy_cell",
    "check_readme",
    "csv_text",
    "delta_cell",
    "hyper_params_cell",
    "learning_curves_figure",
    "load_history",
    "load_results",
    "markdown_tables",
    "model_name",
    "plot_accuracy_vs_bits",
    "plot_learning_curves",
    "precision_cell",
    "provenance_block",
    "quick_marker",
    "read_results",
    "read_results_payload",
    "records_of",
    "update_readme",
    "write_results",
]

RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
TABLES_MD = "tables.md"
PLOT_PNG = "accuracy_vs_bits.png"
CURVES_PNG = "learning_curves.png"
RESULTS_FORMAT = "apot-results/1"
README_START = "<!-- apot:results:start -->"
README_END = "<!-- apot:results:end -->"
CSV_COLUMNS = (
    "arch", "bit", "quantizer", "seed", "state", "final_test_acc", "best_test_acc", "best_epoch",
    "final_train_acc", "epochs_done", "epochs", "wall_time_s", "batch_size", "lr", "weight_decay",
    "schedule", "size_kb", "compression", "error",
)
ACCURACY_NOTE = "Accuracy: final-epoch top-1 on the 10k MNIST test split"
NO_NUMBER = "—"
# Trial state -> the word a table shows; in this order when a cell has several.
STATE_WORDS = {
    "ERROR": "failed",
    "INCOMPLETE": "incomplete",
    "RUNNING": "running",
    "PENDING": "pending",
    "MISSING": "missing",
}
MODEL_FAMILIES = {"resnet": "ResNet"}  # the registry's families (apot.models), as the paper spells them
# Provenance keys shown first, in this order, with their labels; other scalar keys follow as "key: value".
PROVENANCE_LABELS = {
    "epochs": "epochs", "train_subset": "training images", "seeds": "seeds", "hardware": "hardware",
    "gpu_count": "GPUs", "gpu_numerics": "GPU numerics", "date": "date", "code": "code", "python": "python",
    "ray": "ray", "torch": "torch", "wall_time_s": "wall time",
}
# In results.json for programs, not repeated in the "Made with" line (``code`` and ``GPUs`` say it there).
PROVENANCE_HIDDEN = {"git_commit", "git_dirty", "gpu_model"}


class ReportError(RuntimeError):
    """A results file or README that cannot be used; the message is one line naming the file."""


# ------------------------------------------------------------------------------------------ cell formatting
def model_name(arch: str) -> str:
    """Display name of an architecture: ``resnet18`` -> ``ResNet-18``; a name without digits is kept."""
    m = re.fullmatch(r"([A-Za-z_]+?)_?(\d+)(.*)", arch)
    if not m:
        return arch
    family, depth, rest = m.groups()
    return f"{MODEL_FAMILIES.get(family.lower(), family.capitalize())}-{depth}{rest}"


def precision_cell(bit: int) -> str:
    """``5`` -> ``5-bit``; ``32`` (full precision) -> ``FP32``."""
    return "FP32" if int(bit) == FP32_BIT else f"{int(bit)}-bit"


def hyper_params_cell(config: dict[str, Any]) -> str:
    """The paper README's Hyper-Params cell from a trial's config: ``batch128_lr0.01_wd0.0001_25epoch``, plus
    ``_fp32init`` for a quantized trial that started from its FP32 trial's weights (``init_from: fp32``;
    those weights had their own epochs), or ``_init`` from another checkpoint; then ``_<key><value>`` for
    each setting or value since removed that the trial's config sets (`apot.recipe.removed_settings_used`,
    e.g. ``_distill0.5``, ``_augment_affine``), so that its row is not read as this code's recipe.

    Args:
        config: the trial's TrainConfig as a dict (``batch_size``, ``lr``, ``weight_decay``, ``epochs``);
            a key that is absent shows as ``?``.
    """
    def num(key: str) -> str:
        value = config.get(key)
        if value is None:
            return "?"
        return str(value) if isinstance(value, int) else f"{value:g}"

    cell = f"batch{num('batch_size')}_lr{num('lr')}_wd{num('weight_decay')}_{num('epochs')}epoch"
    init_from = config.get("init_from")
    if init_from is not None and config.get("bit") != FP32_BIT:
        cell += "_fp32init" if init_from == "fp32" else "_init"
    removed = removed_settings_used(config)
    return cell + "".join(f"_{k}{v:g}" if _is_number(v) else f"_{k}_{v}" for k, v in removed.items())


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _finished(record: dict[str, Any]) -> bool:
    """A trial whose number may be shown: TERMINATED with a final test accuracy."""
    return record.get("state") == "TERMINATED" and _is_number(record.get("final_test_acc"))


def _state_word(record: dict[str, Any]) -> str:
    state = str(record.get("state") or "MISSING")
    if state == "TERMINATED":
        return "no result"  # terminated without a final accuracy: never a number
    return STATE_WORDS.get(state, state.lower())


def _cell_stats(records: list[dict[str, Any]]) -> tuple[float | None, float, int]:
    """(mean or None, sample std (0 for one seed), n) of the finished trials' final test accuracy."""
    accs = [float(r["final_test_acc"]) for r in records if _finished(r)]
    if not accs:
        return None, 0.0, 0
    std = statistics.stdev(accs) if len(accs) > 1 else 0.0
    return statistics.fmean(accs), std, len(accs)


def accuracy_cell(records: list[dict[str, Any]], show_n: bool = False) -> str:
    """The Accuracy cell of one (arch, bit, quantizer) from its trials (one per seed).

    ``99.52`` (one seed; ``99.52 (n=1)`` with ``show_n``, for a table whose other cells average several),
    ``99.41 ± 0.05 (n=3)`` (mean ± sample std), ``99.40 ± 0.03 (n=2; 1 of 3 failed)`` when some seeds did
    not finish, and only words when none did: ``failed``, ``missing``, ``1 failed, 2 running``.
    """
    if not records:
        return "missing"
    mean, std, n = _cell_stats(records)
    counts: dict[str, int] = {}
    for r in records:
        if not _finished(r):
            word = _state_word(r)
            counts[word] = counts.get(word, 0) + 1
    order = list(STATE_WORDS.values())
    words = sorted(counts, key=lambda w: order.index(w) if w in order else len(order))
    if mean is None:
        if len(words) == 1:
            return words[0]
        return ", ".join(f"{counts[w]} {w}" for w in words)
    text = f"{mean:.2f}"
    notes = []
    if n > 1:
        text += f" ± {std:.2f}"
    if n > 1 or show_n:
        notes.append(f"n={n}")
    notes += [f"{counts[w]} of {len(records)} {w}" for w in words]
    return f"{text} ({'; '.join(notes)})" if notes else text


def delta_cell(uniform: list[dict[str, Any]], apot: list[dict[str, Any]]) -> str:
    """Compared with APoT: uniform minus APoT of the two accuracies as shown (2 decimals), signed
    (``+0.12``, ``-0.30``, ``+0.00``); ``—`` unless both sides have a number."""
    u, _, _ = _cell_stats(uniform)
    a, _, _ = _cell_stats(apot)
    if u is None or a is None:
        return NO_NUMBER
    delta = round(round(u, 2) - round(a, 2), 2)
    return f"{delta + 0.0:+.2f}"  # + 0.0 turns -0.0 into +0.00


# ------------------------------------------------------------------------------------------ grouping
def _arch_key(arch: str) -> tuple[str, int, str]:
    """Natural order: resnet18 < resnet34 < resnet50 < resnet101."""
    m = re.fullmatch(r"(\D*)(\d+)(.*)", arch)
    return (m.group(1), int(m.group(2)), m.group(3)) if m else (arch, -1, "")


def _point(record: dict[str, Any]) -> tuple[str, int, bool, Any]:
    return str(record["arch"]), int(record["bit"]), bool(record["power"]), record.get("seed")


def _cells(
    records: list[dict[str, Any]], expected: list[dict[str, Any]] | None
) -> dict[tuple[str, int, bool], list[dict[str, Any]]]:
    """Trials per (arch, bit, power), with a MISSING placeholder for each expected point without a record."""
    cells: dict[tuple[str, int, bool], list[dict[str, Any]]] = {}
    for r in records:
        arch, bit, power, _ = _point(r)
        cells.setdefault((arch, bit, power), []).append(r)
    have = {_point(r) for r in records}
    for p in expected or []:
        if _point(p) not in have:
            arch, bit, power, seed = _point(p)
            placeholder = {"arch": arch, "bit": bit, "power": power, "seed": seed, "state": "MISSING"}
            cells.setdefault((arch, bit, power), []).append(placeholder)
    return cells


def _group(
    cells: dict[tuple[str, int, bool], list[dict[str, Any]]], arch: str, bit: int, power: bool
) -> list[dict[str, Any]] | None:
    """The trials of one table cell. FP32 has no quantizer: its trials (whatever their ``power``) are the
    FP32 row of both tables, the ceiling each quantized number is read against."""
    if bit == FP32_BIT:
        group = cells.get((arch, bit, True), []) + cells.get((arch, bit, False), [])
        return group or None
    return cells.get((arch, bit, power))


def _row_keys(cells: Iterable[tuple[str, int, bool]]) -> list[tuple[str, int]]:
    """(arch, bit) rows: arch in natural order, then bits descending (FP32 first)."""
    rows = {(arch, bit) for arch, bit, _ in cells}
    return sorted(rows, key=lambda ab: (_arch_key(ab[0]), -ab[1]))


def _hyper_params(records: list[dict[str, Any]]) -> str:
    """Each distinct config's cell (normally exactly one); ``—`` when no trial has a config."""
    distinct = dict.fromkeys(hyper_params_cell(r["config"]) for r in records if r.get("config"))
    return "<br>".join(distinct) if distinct else NO_NUMBER


# ------------------------------------------------------------------------------------------ provenance
def _duration(seconds: float) -> str:
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s" if m else f"{s}s"


def _config_value(records: list[dict[str, Any]], key: str) -> Any:
    values = {r["config"].get(key) for r in records if r.get("config")}
    return values.pop() if len(values) == 1 else None


def quick_marker(provenance: dict[str, Any], records: list[dict[str, Any]] | None = None) -> str:
    """``(quick run: 2 epochs on 4096 images — not comparable to the paper)``; ``""`` if not quick."""
    if not provenance.get("quick"):
        return ""
    records = records or []
    epochs = provenance.get("epochs") or _config_value(records, "epochs")
    subset = provenance["train_subset"] if "train_subset" in provenance else _config_value(
        records, "train_subset")
    images = f"{subset} training images" if subset else "the full training split"
    epochs = "?" if epochs is None else epochs
    return f"(quick run: {epochs} epochs on {images} — not comparable to the paper)"


def _made_with(provenance: dict[str, Any]) -> str:
    """The ``Made with:`` parts of one provenance, joined: the labelled keys first, then other scalars."""
    parts = []
    for key, label in PROVENANCE_LABELS.items():
        value = provenance.get(key)
        if value is None:
            continue
        if key == "epochs":
            parts.append(f"{value} epochs")
        elif key == "train_subset":
            parts.append(f"first {value} training images")
        elif key == "seeds":
            seeds = value if isinstance(value, (list, tuple)) else [value]
            parts.append(f"seeds {', '.join(str(s) for s in seeds)}")
        elif key == "wall_time_s" and _is_number(value):
            parts.append(f"wall time {_duration(value)}")
        elif key == "gpu_count":
            model = provenance.get("gpu_model") or "GPU"
            parts.append(f"GPUs {value} x {model}" if value else "GPUs none")
        else:
            parts.append(f"{label} {value}")
    skip = {*PROVENANCE_LABELS, *PROVENANCE_HIDDEN, "quick", "command"}
    parts += [f"{k} {v}" for k, v in provenance.items()
              if k not in skip and v is not None and isinstance(v, (str, int, float, bool))]
    return "; ".join(parts) if parts else "unknown"


def provenance_block(provenance: dict[str, Any]) -> str:
    """How the numbers were made: a QUICK RUN line if quick, a ``Made with:`` line, a ``Command:`` line; for
    a report over several sweeps (``apot.combine``: ``sweeps``) one line per sweep after them, with the
    trials it gave, its own provenance and the trials of it left out."""
    lines = []
    if provenance.get("quick"):
        lines.append("**QUICK RUN — a smoke test, not comparable to the paper.**")
    sweeps = provenance.get("sweeps") or []
    made_with = _made_with(provenance)
    if sweeps:
        made_with += f"; {len(sweeps)} sweeps combined, each below"
    lines.append(f"Made with: {made_with}.")
    if provenance.get("command"):
        lines.append(f"Command: `{provenance['command']}`")
    for sweep in sweeps:
        own = sweep.get("provenance") or {}
        command = f" Command: `{own['command']}`" if own.get("command") else ""
        lines.append(f"- `{sweep.get('name')}`, {sweep.get('trials')} trials used: {_made_with(own)}."
                     f"{command}")
        if sweep.get("left_out"):
            lines.append(f"  Left out of `{sweep.get('name')}` (a sweep listed before it holds the point): "
                         f"{', '.join(sweep['left_out'])}.")
    return "  \n".join(lines)


# ------------------------------------------------------------------------------------------ tables
def markdown_tables(
    records: list[dict[str, Any]], provenance: dict[str, Any], expected: list[dict[str, Any]] | None = None
) -> str:
    """Both tables in the paper README's format, under the provenance and the accuracy definition.

    Args:
        records: trial records (docs/ARCHITECTURE.md).
        provenance: how the numbers were made (see the module docstring); ``quick`` marks every heading.
        expected: the grid points (arch, bit, power, seed) that should exist; those without a record are
            shown as ``missing``. None: only the records' points.
    """
    cells = _cells(records, expected)
    rows = _row_keys(cells)
    show_n = any(_cell_stats(group)[2] > 1 for group in cells.values())  # then every cell says its n
    quick = quick_marker(provenance, records)
    suffix = f" {quick}" if quick else ""
    out = [
        provenance_block(provenance),
        "",
        f"{ACCURACY_NOTE} (percent), mean over seeds; `± s` is the sample standard deviation over the "
        "`n` seeds averaged. The best epoch is in results.csv and never used here. "
        "Compared with APoT = uniform minus APoT, from the two accuracies shown. FP32 (full precision, "
        "no quantizer) is the same trials in both tables: the ceiling of its model.",
        "",
        f"### APoT (power=True){suffix}",
        "",
        "| Model | Precision | Hyper-Params | Accuracy |",
        "|:---:|:---:|:---:|:---:|",
    ]
    for arch, bit in rows:
        group = _group(cells, arch, bit, True)
        if group is None:
            continue
        out.append(f"| {model_name(arch)} | {precision_cell(bit)} | {_hyper_params(group)} "
                   f"| {accuracy_cell(group, show_n)} |")
    out += [
        "",
        f"### Uniform (power=False){suffix}",
        "",
        "| Model | Precision | Hyper-Params | Accuracy | Compared with APoT |",
        "|:---:|:---:|:---:|:---:|:---:|",
    ]
    for arch, bit in rows:
        group = _group(cells, arch, bit, False)
        if group is None:
            continue
        delta = NO_NUMBER if bit == FP32_BIT else delta_cell(group, cells.get((arch, bit, True), []))
        out.append(f"| {model_name(arch)} | {precision_cell(bit)} | {_hyper_params(group)} "
                   f"| {accuracy_cell(group, show_n)} | {delta} |")
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------ files
def _csv_value(value: Any) -> Any:
    return "" if value is None else value


def csv_text(records: list[dict[str, Any]]) -> str:
    """results.csv: one row per record, columns ``CSV_COLUMNS``; absent values are empty (``size_kb``: the
    packed size of the trial's export in KB, ``compression``: FP32 size / packed size; see apot.export)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in records:
        config = r.get("config") or {}
        row = {k: r.get(k) for k in CSV_COLUMNS}
        row["quantizer"] = quantizer_name(r.get("power"))
        for key in ("epochs", "batch_size", "lr", "weight_decay", "schedule"):
            row[key] = config.get(key)
        writer.writerow({k: _csv_value(v) for k, v in row.items()})
    return buf.getvalue()


def _seeds_text(provenance: dict[str, Any]) -> str:
    """``seeds 0, 1, 2`` from the provenance (one seed or a list), or ``""`` when it names none."""
    seeds = provenance.get("seeds")
    if not seeds:
        return ""
    seeds = seeds if isinstance(seeds, (list, tuple)) else [seeds]
    return f"seeds {', '.join(str(s) for s in seeds)}"


def _suptitle(fig: Figure, title: str, provenance: dict[str, Any], records: list[dict[str, Any]]) -> None:
    """Set a PNG's title: ``title``, then the run's date and, for a quick run, a second line saying so."""
    if provenance.get("date"):
        title += f", {provenance['date']}"
    quick = quick_marker(provenance, records)
    if quick:
        title += "\n" + quick.strip("()").replace("quick run", "QUICK RUN", 1)
    fig.suptitle(title, fontsize=10)


def plot_accuracy_vs_bits(
    records: list[dict[str, Any]], provenance: dict[str, Any], expected: list[dict[str, Any]] | None = None
) -> bytes:
    """accuracy_vs_bits.png as bytes: a panel per arch, bits descending on x, final test accuracy on y,
    APoT and uniform lines with error bars = sample std over seeds; points without a number are left out."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg, without touching pyplot's state
    from matplotlib.figure import Figure

    cells = _cells(records, expected)
    archs = sorted({arch for arch, _, _ in cells}, key=_arch_key)
    bits = sorted({bit for _, bit, _ in cells}, reverse=True)
    fig = Figure(figsize=(4.2 * max(1, len(archs)), 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, max(1, len(archs)), squeeze=False)[0]
    if not archs:
        axes[0].text(0.5, 0.5, "no trials", ha="center", va="center", transform=axes[0].transAxes)
    for ax, arch in zip(axes[: len(archs)], archs, strict=True):
        for power, label, style in ((True, "APoT", "o-"), (False, "uniform", "s--")):
            xs, ys, es = [], [], []
            for i, bit in enumerate(bits):
                mean, std, _ = _cell_stats(_group(cells, arch, bit, power) or [])
                if mean is not None:
                    xs.append(i)
                    ys.append(mean)
                    es.append(std)
            if xs:
                ax.errorbar(xs, ys, yerr=es, fmt=style, capsize=3, label=label)
        ax.set_title(model_name(arch))
        ax.set_xticks(range(len(bits)), [precision_cell(b) for b in bits])
        ax.set_xlim(-0.4, len(bits) - 0.6)
        ax.set_xlabel("weight/activation precision")
        ax.set_ylabel("final test accuracy (%)")
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend()
    title = "APoT vs uniform quantization on MNIST"
    if provenance.get("epochs") is not None:
        title += f" — {provenance['epochs']} epochs"
    if _seeds_text(provenance):
        title += f", {_seeds_text(provenance)}"
    _suptitle(fig, title, provenance, records)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


# Accuracy near 100% on the error's log scale: tick values (percent) offered to a learning-curve panel.
ACC_TICKS = (0, 25, 50, 70, 80, 90, 95, 98, 99, 99.5, 99.8, 99.9, 99.95, 99.98, 99.99)
# A bit width keeps its colour in every figure, whichever bits a sweep has.
BIT_COLOURS = {32: "black", 8: "tab:gray", 6: "tab:purple", 5: "tab:blue", 4: "tab:orange", 3: "tab:green",
               2: "tab:red"}
MIN_ERROR = 0.01  # percent: 100% accuracy is drawn as 99.99% (log of a zero error)


def _curve_label(bit: int, power: bool) -> str:
    return "FP32" if int(bit) == FP32_BIT else f"{'APoT' if power else 'uniform'} {precision_cell(bit)}"


def learning_curves_figure(records: list[dict[str, Any]], provenance: dict[str, Any]) -> Figure:
    """The learning-curve figure: test accuracy per epoch of every trial with a history (unfinished ones
    too, as far as they got), a panel per arch, one line per trial. Colour = bit width (``BIT_COLOURS``),
    solid = APoT, dashed = uniform, one legend entry per (quantizer, bits); seeds of one point share colour
    and style. The y axis is accuracy on a log scale of the error (100 - acc), so 99.0, 99.5 and 99.9 stay
    apart; 100% is drawn at 99.99%."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullLocator

    curves = [r for r in records if any(_is_number(h.get("test_acc")) for h in r.get("history") or [])]
    archs = sorted({str(r["arch"]) for r in curves}, key=_arch_key)
    others = ["tab:brown", "tab:pink", "tab:olive", "tab:cyan"]
    colour = dict(BIT_COLOURS)
    for i, bit in enumerate(sorted({int(r["bit"]) for r in curves} - set(BIT_COLOURS))):
        colour[bit] = others[i % len(others)]

    def forward(acc: Any) -> Any:
        return -np.log10(np.clip(100.0 - np.asarray(acc, dtype=float), MIN_ERROR, None))

    def inverse(y: Any) -> Any:
        return 100.0 - 10.0 ** (-np.asarray(y, dtype=float))

    fig = Figure(figsize=(4.2 * max(1, len(archs)) + 1.6, 4.4), layout="constrained")  # + the legend
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, max(1, len(archs)), squeeze=False)[0]
    if not archs:
        axes[0].text(0.5, 0.5, "no per-epoch history", ha="center", va="center", transform=axes[0].transAxes)
    handles: dict[tuple[bool, int], Any] = {}  # (not power, -bit): APoT before uniform, bits descending
    for ax, arch in zip(axes[: len(archs)], archs, strict=True):
        accs = []
        for r in sorted((r for r in curves if r["arch"] == arch), key=lambda r: -int(r["bit"])):
            points = [(h["epoch"], float(h["test_acc"])) for h in r["history"]
                      if _is_number(h.get("test_acc"))]
            xs, ys = zip(*points, strict=True)
            accs += ys
            bit, power = int(r["bit"]), bool(r["power"])
            (line,) = ax.plot(xs, np.minimum(ys, 100.0 - MIN_ERROR), color=colour[bit],
                              linestyle="-" if power or bit == FP32_BIT else "--",
                              marker="o" if power else "s",
                              markersize=3 if len(xs) <= 30 else 0, linewidth=1.3, alpha=0.85)
            handles.setdefault((not power and bit != FP32_BIT, -bit), line)
        ax.set_yscale("function", functions=(forward, inverse))
        top = 100.0 - max(100.0 - max(accs), MIN_ERROR) / 2
        bottom = max(0.0, 100.0 - (100.0 - min(accs)) * 1.5)
        ax.set_ylim(bottom, top)
        ax.yaxis.set_major_locator(FixedLocator([t for t in ACC_TICKS if bottom <= t <= top]))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(model_name(arch))
        ax.set_xlabel("epoch")
        ax.set_ylabel("test accuracy (%), log scale of the error")
        ax.grid(alpha=0.3)
    if handles:
        keys = sorted(handles)
        fig.legend([handles[k] for k in keys], [_curve_label(-k[1], not k[0]) for k in keys],
                   loc="outside right center", fontsize=8)
    title = "Test accuracy per epoch"
    if _seeds_text(provenance):
        title += f" — {_seeds_text(provenance)}"
    _suptitle(fig, title, provenance, records)
    return fig


def plot_learning_curves(records: list[dict[str, Any]], provenance: dict[str, Any]) -> bytes:
    """learning_curves.png as bytes (``learning_curves_figure``)."""
    buf = io.BytesIO()
    learning_curves_figure(records, provenance).savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def write_results(
    records: list[dict[str, Any]],
    out_dir: Path,
    provenance: dict[str, Any],
    expected: list[dict[str, Any]] | None = None,
) -> dict[str, Path]:
    """Write results.json, results.csv, tables.md, accuracy_vs_bits.png and learning_curves.png into
    ``out_dir``, each atomically.

    Args:
        records: trial records (docs/ARCHITECTURE.md), history included.
        out_dir: folder to write into (created if absent).
        provenance: how the numbers were made; stored in results.json and shown above the tables.
        expected: grid points (arch, bit, power, seed); points without a record show as ``missing``.

    Returns:
        ``{"results.json": path, "results.csv": path, "tables.md": path, "accuracy_vs_bits.png": path,
        "learning_curves.png": path}``.
    """
    out_dir = Path(out_dir)
    payload = {"format": RESULTS_FORMAT, "provenance": provenance, "records": records}
    if expected is not None:
        keys = ("arch", "bit", "power", "seed")
        payload["expected"] = [{k: p[k] for k in keys if k in p} for p in expected]
    contents = {
        RESULTS_JSON: (json.dumps(payload, indent=2) + "\n").encode(),
        RESULTS_CSV: csv_text(records).encode(),
        TABLES_MD: markdown_tables(records, provenance, expected).encode(),
        PLOT_PNG: plot_accuracy_vs_bits(records, provenance, expected),
        CURVES_PNG: plot_learning_curves(records, provenance),
    }  # everything rendered before the first write: a rendering error leaves the old files as they were
    paths = {}
    for name, data in contents.items():
        paths[name] = out_dir / name
        atomic_write_bytes(paths[name], data)
    return paths


def read_results(out_dir: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Read ``out_dir/results.json`` back as ``(records, provenance)``.

    Raises ``ReportError`` (one line naming the file) when it is absent, not JSON, or not apot results.
    """
    payload = read_results_payload(out_dir)
    return payload["records"], payload["provenance"]


def read_results_payload(out_dir: Path) -> dict[str, Any]:
    """``out_dir/results.json`` as written (``records``, ``provenance`` and, when known, ``expected``),
    checked as `read_results` does."""
    path = Path(out_dir) / RESULTS_JSON
    try:
        payload = json.loads(path.read_text())
    except FileNotFoundError:
        raise ReportError(f"{path}: no results file; run the sweep first (or check --storage)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReportError(f"{path}: cannot read results ({type(exc).__name__}: {exc}); "
                          "rebuild it with --report-only or delete it") from None
    records = payload.get("records") if isinstance(payload, dict) else None
    provenance = payload.get("provenance") if isinstance(payload, dict) else None
    if not isinstance(records, list) or not isinstance(provenance, dict):
        raise ReportError(f"{path}: not an apot results file (needs 'records' list and 'provenance' object)")
    for i, r in enumerate(records):
        missing = [k for k in ("arch", "bit", "power", "state") if not isinstance(r, dict) or k not in r]
        if missing:
            raise ReportError(f"{path}: record {i} is not a trial record (missing {', '.join(missing)})")
    return payload


def records_of(path: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``(records, provenance)`` of an experiment folder or its results.json; a sweep still running (no
    results.json yet) is read from its ``records/*.json``, with an empty provenance."""
    path = Path(path)
    folder = path.parent if path.name == RESULTS_JSON else path
    if (folder / RESULTS_JSON).exists() or not (folder / "records").is_dir():
        return read_results(folder)
    records = []
    for file in sorted((folder / "records").glob("*.json")):
        try:
            records.append(json.loads(file.read_text()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ReportError(f"{file}: cannot read trial record ({type(exc).__name__}: {exc})") from None
    return records, {}


def load_results(path: Path | str) -> pd.DataFrame:
    """One row per trial as a pandas DataFrame, the columns of results.csv (``CSV_COLUMNS``: arch, bit,
    quantizer, seed, state, final_test_acc, ...; NaN where a trial has no value).

    Args:
        path: an experiment folder (``<storage>/<name>``) or its results.json. A sweep still running (no
            results.json yet) is read from its ``records/``.

    Returns:
        the DataFrame; ``df.attrs["provenance"]`` holds how the numbers were made (empty mid-sweep).

    Raises ``ReportError`` (one line naming the file) when nothing readable is there.
    """
    import pandas as pd  # comes with ray[tune]

    records, provenance = records_of(Path(path))
    df = pd.read_csv(io.StringIO(csv_text(records)))  # exactly results.csv's columns and values
    df.attrs["provenance"] = provenance
    return df


def load_history(path: Path | str) -> pd.DataFrame:
    """One row per (trial, epoch) as a pandas DataFrame: arch, bit, quantizer, seed, state, then every
    per-epoch metric (epoch, train_loss, train_acc, test_loss, test_acc, lr, ...). ``path`` as for
    ``load_results``; ``df.attrs["provenance"]`` likewise."""
    import pandas as pd

    records, provenance = records_of(Path(path))
    rows = [{"arch": r["arch"], "bit": r["bit"], "quantizer": quantizer_name(r["power"]),
             "seed": r.get("seed"), "state": r["state"], **h}
            for r in records for h in r.get("history") or []]
    df = pd.DataFrame(rows, columns=None if rows else ["arch", "bit", "quantizer", "seed", "state", "epoch"])
    df.attrs["provenance"] = provenance
    return df


def check_readme(readme: Path) -> str:
    """The text of ``readme`` if it can take the tables (it exists and has exactly one ordered pair of
    markers); else ``ReportError``, one line saying what to add. Cheap: call it before a sweep."""
    readme = Path(readme)
    try:
        text = readme.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ReportError(f"{readme}: no such file; create it with the lines {README_START} and "
                          f"{README_END} where the tables go") from None
    starts, ends = text.count(README_START), text.count(README_END)
    if starts != 1 or ends != 1 or text.index(README_START) > text.index(README_END):
        raise ReportError(
            f"{readme}: needs exactly one '{README_START}' line followed by one '{README_END}' line "
            f"(found {starts} start, {ends} end); add them where the results tables should go"
        )
    return text


def update_readme(readme: Path, tables_md: str, provenance: dict[str, Any]) -> None:
    """Replace the text between ``<!-- apot:results:start -->`` and ``<!-- apot:results:end -->`` in
    ``readme`` with ``tables_md`` (preceded by the provenance block unless it already holds it); every byte
    outside the markers stays as it was. Atomic write.

    Raises ``ReportError`` (one line) when the file is absent or lacks exactly one ordered pair of markers.
    """
    readme = Path(readme)
    text = check_readme(readme)
    block = provenance_block(provenance)
    body = tables_md.strip("\n")
    if block not in body:
        body = f"{block}\n\n{body}"
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    new = f"{head}{README_START}\n{body}\n{README_END}{tail}"
    atomic_write_bytes(readme, new.encode("utf-8"))

"""The per-layer report as a PNG: reconstruction error (nearest vs AdaRound), undecided h(V), the share
of weights rounded up vs down (the paper's question), and the loss curves."""
from __future__ import annotations

import math

from .modules import check_output_path
from .report import QuantizationReport


def _value(x) -> float:
    return math.nan if x is None else float(x)


def report_figure(report: QuantizationReport, title: str = ""):
    """A matplotlib Figure (no pyplot state) drawn from `report`'s own numbers."""
    from matplotlib.figure import Figure

    if not report.layers:
        raise ValueError("the report has no layers to plot")
    names = [r.name for r in report.layers]
    xs = list(range(len(names)))
    fig = Figure(figsize=(max(10.0, 0.45 * len(names) + 4), 11), layout="constrained")
    err, undecided, updown, curves = fig.subplots(4, 1)

    width = 0.4
    err.bar([x - width / 2 for x in xs], [_value(r.nearest_error) for r in report.layers], width,
            label="nearest", color="tab:gray")
    err.bar([x + width / 2 for x in xs], [_value(r.adaround_error) for r in report.layers], width,
            label="AdaRound", color="tab:blue")
    err.set_yscale("log")
    err.set_ylabel("reconstruction error")
    err.legend()

    undecided.bar(xs, [_value(r.undecided_fraction) for r in report.layers], color="tab:orange")
    undecided.set_ylabel("undecided h(V)")

    up = [_value(r.rounded_up_fraction) for r in report.layers]
    updown.bar(xs, up, label="rounded up", color="tab:green")
    updown.bar(xs, [1 - u for u in up], bottom=up, label="rounded down", color="tab:red", alpha=0.6)
    updown.axhline(0.5, color="black", linewidth=0.8, linestyle="--")
    updown.set_ylim(0, 1)
    updown.set_ylabel("share of weights")
    updown.legend(loc="upper right")
    for ax in (err, undecided, updown):
        ax.set_xticks(xs, names, rotation=60, ha="right", fontsize=7)

    for r in report.layers:
        if len(r.loss_curve) > 1:
            n = len(r.loss_curve) - 1
            curves.plot([i / n for i in range(n + 1)], r.loss_curve, linewidth=0.8, label=r.name)
    curves.set_yscale("log")
    curves.set_xlabel("fraction of the iterations")
    curves.set_ylabel("loss (reconstruction + regulariser)")
    if curves.lines:
        curves.legend(fontsize=6, ncol=4)
    fig.suptitle(title or f"AdaRound per-layer report ({report.device})")
    return fig


def save_report_plot(report: QuantizationReport, path: str, title: str = ""):
    """Writes the report figure as PNG at `path` and returns the figure."""
    check_output_path(path)
    fig = report_figure(report, title)
    fig.savefig(path, format="png", dpi=110)
    return fig

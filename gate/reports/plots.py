"""Plots for the HTML report, drawn with matplotlib and embedded as data URIs (self-contained)."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

from gate.reports.view import ReportView, finite, run_of


@dataclass
class Plot:
    """One figure of the report."""

    title: str
    """Caption."""
    data_uri: str
    """The SVG, as a data: URI (no file or host is requested when the report opens)."""


def build_plots(view: ReportView) -> list[Plot]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.hashsalt": "gate", "font.size": 9})  # stable SVG ids
    plots = []
    for column in view.columns:
        if column.key[0] != "base":
            continue
        figure = _metric_plot(plt, view, column)
        if figure is not None:
            plots.append(Plot(column.title, _to_uri(plt, figure)))
    gated = {(c.key[1], c.key[2]) for c in view.columns if c.key[0] == "base"}
    for suite in view.drift_suites:
        for metric, title in DRIFT_TITLES.items():
            if (suite, metric) in gated:
                continue  # already drawn with its limit and bounds
            figure = _drift_plot(plt, view, suite, metric)
            if figure is not None:
                plots.append(Plot(f"{suite}: {title} by training step", _to_uri(plt, figure)))
    loss = _loss_plot(plt, view)
    if loss is not None:
        plots.append(Plot("training and evaluation loss logged by the Trainer", _to_uri(plt, loss)))
    return plots


def _metric_plot(plt, view: ReportView, column):
    against, suite, metric, bound, margin = column.key
    points: dict[str, list] = {}
    base_value = limit = None
    for verdict in view.verdict.checkpoints:
        check = next((c for c in verdict.checks if (c.against, c.suite, c.metric, c.bound, c.margin) == column.key), None)
        if check is None or verdict.step is None or not finite(check.value):
            continue
        low, high = _value_bounds(check)
        points.setdefault(run_of(verdict.name), []).append((verdict.step, check.value, low, high, verdict.name))
        if finite(check.base_value):
            base_value = check.base_value
        if finite(check.limit):
            limit = check.limit  # recorded by the policy: the reports never recompute a threshold
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.2), dpi=100)
    for run, rows in sorted(points.items()):
        rows.sort()
        steps = [r[0] for r in rows]
        ax.plot(steps, [r[1] for r in rows], marker="o", label=run)
        ax.fill_between(steps, [r[2] for r in rows], [r[3] for r in rows], alpha=0.2)
        for step, value, _, _, name in rows:
            if name == view.verdict.selected:
                ax.plot([step], [value], marker="*", markersize=16, color="black", linestyle="none", label="selected")
    if base_value is not None:
        ax.axhline(base_value, color="grey", linestyle="--", linewidth=1, label="base")
    if limit is not None:
        ax.axhline(limit, color="#c0392b", linestyle=":", linewidth=1, label=bound if bound in ("min", "max") else "margin")
    values = [r[1] for rows in points.values() for r in rows] + ([base_value] if base_value else [])
    if min(values) > 0 and max(values) / min(values) > 10:
        ax.set_yscale("log")  # one collapsed run must not flatten the others and the base line
    ax.set_xlabel("training step")
    ax.set_ylabel(metric)
    ax.set_title(column.title)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


DRIFT_TITLES = {"kl": "KL(base ‖ checkpoint) per token, nats", "top1": "top-1 agreement with the base"}


def _drift_plot(plt, view: ReportView, suite: str, metric: str):
    """A drift metric of one suite against the training step, one line per run, the selected checkpoint starred."""
    points: dict[str, list] = {}
    for ckpt in view.results.checkpoints:
        score = ckpt.scores.get(suite)
        if ckpt.step is None or score is None or score.drift is None:
            continue
        points.setdefault(run_of(ckpt.name), []).append((ckpt.step, score.kl if metric == "kl" else score.top1, ckpt.name))
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.2), dpi=100)
    for run, rows in sorted(points.items()):
        rows.sort()
        ax.plot([r[0] for r in rows], [r[1] for r in rows], marker="o", label=run)
        for step, value, name in rows:
            if name == view.verdict.selected:
                ax.plot([step], [value], marker="*", markersize=16, color="black", linestyle="none", label="selected")
    ax.axhline(0.0 if metric == "kl" else 1.0, color="grey", linestyle="--", linewidth=1, label="base")
    ax.set_xlabel("training step")
    ax.set_ylabel(metric)
    ax.set_title(f"{suite}.{metric}")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def _value_bounds(check) -> tuple[float, float]:
    if check.low is None or check.high is None:
        return check.value, check.value  # no interval (a degenerate sample): no band
    if check.kind == "floor":
        return check.low, check.high
    if check.relative:
        return check.base_value * (1 + check.low), check.base_value * (1 + check.high)
    return check.base_value + check.low, check.base_value + check.high


def _loss_plot(plt, view: ReportView):
    runs: dict[str, list] = {}
    for ckpt in view.results.checkpoints:
        if ckpt.step is not None and (ckpt.train_loss is not None or ckpt.eval_loss is not None):
            runs.setdefault(run_of(ckpt.name), []).append((ckpt.step, ckpt.train_loss, ckpt.eval_loss))
    if not runs:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.2), dpi=100)
    for run, rows in sorted(runs.items()):
        rows.sort()
        for index, kind in ((1, "train"), (2, "eval")):
            pairs = [(r[0], r[index]) for r in rows if r[index] is not None]
            if pairs:
                ax.plot(*zip(*pairs), marker="o", linestyle="-" if kind == "train" else "--", label=f"{run} {kind}")
    ax.set_xlabel("training step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def _to_uri(plt, fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="svg", metadata={"Date": None})
    plt.close(fig)
    return "data:image/svg+xml;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")

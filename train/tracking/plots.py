"""Plots of tracked runs as PNG, readable without the MLflow UI.

The functions build ``matplotlib.figure.Figure`` objects from plain data (no pyplot, so no
global backend state and nothing opens a window); callers save or log them. ``run_figures``
reads one run's metric histories from MLflow and is what a training run logs at its end;
``simcot compare --plot`` uses the same builders across runs.
"""

from __future__ import annotations

import re
from collections import defaultdict

from matplotlib.figure import Figure

# Loss components, in the order they are drawn (whichever a method logs).
LOSS_KEYS = ("train/loss", "train/ce", "train/teacher_ce", "train/distill", "train/decoder_ce")
# Accuracy by number of latents: `{split}/latents_{k}/accuracy`.
LATENTS_ACCURACY = re.compile(r"^(?P<split>[^/]+)/latents_(?P<k>\d+)/accuracy$")

Curve = list[tuple[int, float]]  # (step, value), sorted by step


def history(client, run_id: str, key: str) -> Curve:
    """A metric's values by step; where a resumed run logged a step twice, the later value wins."""
    by_step: dict[int, tuple[int, float]] = {}
    for m in client.get_metric_history(run_id, key):
        if m.step not in by_step or m.timestamp >= by_step[m.step][0]:
            by_step[m.step] = (m.timestamp, m.value)
    return [(s, v) for s, (_, v) in sorted(by_step.items())]


def latents_accuracy(metrics: dict[str, float], split: str) -> dict[int, float]:
    """{k: accuracy} from a run's `{split}/latents_{k}/accuracy` metrics."""
    out = {}
    for key, value in metrics.items():
        m = LATENTS_ACCURACY.match(key)
        if m and m["split"] == split:
            out[int(m["k"])] = value
    return out


def draw_curves(ax, curves: dict[str, Curve], title: str, ylabel: str) -> None:
    for label, curve in curves.items():
        if curve:
            ax.plot([s for s, _ in curve], [v for _, v in curve], label=label, linewidth=1.2)
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    _legend_or_note(ax, curves, f"no {ylabel} logged")


def draw_latents(ax, series: dict[str, dict[int, float]], title: str) -> None:
    for label, points in series.items():
        if points:
            ks = sorted(points)
            ax.plot(ks, [points[k] for k in ks], marker="o", label=label)
    ax.set(title=title, xlabel="number of latents", ylabel="accuracy", ylim=(-0.02, 1.02))
    ks = sorted(set().union(*series.values())) if series else []
    if 0 < len(ks) <= 16:  # latent counts are few and whole: tick exactly those
        ax.set_xticks(ks)
    _legend_or_note(ax, series, "no accuracy metrics")


def _legend_or_note(ax, data: dict, note: str) -> None:
    if any(data.values()):
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    else:
        ax.text(0.5, 0.5, note, ha="center", va="center", transform=ax.transAxes)


def run_figures(client, run_id: str) -> dict[str, Figure]:
    """The end-of-run plots of one run: loss curves, and accuracy vs number of latents when the
    run has `{split}/latents_{k}/accuracy` metrics. Keys are artifact names."""
    run = client.get_run(run_id)
    metrics = run.data.metrics
    name = run.data.tags.get("mlflow.runName", run_id[:8])
    figures = {}
    losses = {k: history(client, run_id, k) for k in LOSS_KEYS if k in metrics}
    if losses:
        fig = Figure(figsize=(7, 4.5), layout="constrained")
        draw_curves(fig.add_subplot(), losses, f"training loss: {name}", "loss")
        figures["plots/loss.png"] = fig
    by_split = {split: latents_accuracy(metrics, split) for split in ("val", "test")}
    by_split = {s: pts for s, pts in by_split.items() if pts}
    if by_split:
        fig = Figure(figsize=(6, 4.5), layout="constrained")
        draw_latents(fig.add_subplot(), by_split, f"accuracy vs number of latents: {name}")
        figures["plots/accuracy_vs_latents.png"] = fig
    return figures


def comparison_figure(loss_curves: dict[str, Curve], latent_series: dict[str, dict[int, float]],
                      split: str) -> Figure:
    """Two panels: accuracy vs number of latents (one line per method) and train/loss (one line per run)."""
    fig = Figure(figsize=(13, 5), layout="constrained")
    left, right = fig.subplots(1, 2)
    draw_latents(left, latent_series, f"{split} accuracy vs number of latents")
    draw_curves(right, loss_curves, "train/loss", "loss")
    return fig


def mean_by_key(groups: dict[str, list[dict[int, float]]]) -> dict[str, dict[int, float]]:
    """Average several runs' {k: value} per group and k (e.g. seeds of one method)."""
    out = {}
    for group, runs in groups.items():
        acc: dict[int, list[float]] = defaultdict(list)
        for points in runs:
            for k, v in points.items():
                acc[k].append(v)
        out[group] = {k: sum(vs) / len(vs) for k, vs in sorted(acc.items())}
    return out

"""The report's figures, drawn with matplotlib's Agg backend (no display needed).

Importing this module imports matplotlib; callers import it only when they write a figure.
:func:`plan_bandwidth` is the bench figure as plain data, which the tests check.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402

from .tables import NOISY_CORES  # noqa: E402  (cells timed while other processes were busy)

#: Line styles by implementation kind: fastrms solid and thick, baselines dotted, peers dashed.
_STYLE = {"fastrms": dict(linestyle="-", linewidth=2.0, marker="o", markersize=4),
          "baseline": dict(linestyle=":", linewidth=1.6, marker="s", markersize=4),
          "peer": dict(linestyle="--", linewidth=1.4, marker="^", markersize=4)}
#: The automatic choice usually is the C backend, so its line would hide C's: thinner,
#: dash-dotted, with open markers, and drawn on top.
_AUTO_STYLE = dict(linestyle="-.", linewidth=1.3, marker="D", markersize=6,
                   markerfacecolor="none", zorder=4)
_ROOFLINE_STYLE = dict(color="black", linestyle=(0, (6, 3)), linewidth=2.8, marker="",
                       zorder=5)
_ABOVE_STYLE = dict(marker="o", markersize=13, markerfacecolor="none", markeredgecolor="red",
                    markeredgewidth=2.0, linestyle="", zorder=6)
#: A row faster than the roofline by more than this is flagged: the roofline moves the same
#: bytes with trivial arithmetic, so such a figure says the timing, not the kernel, is off.
ABOVE_ROOFLINE = 1.0
AUTO = "fastrms-auto"


def plan_bandwidth(report: dict) -> dict:
    """What :func:`plot_bandwidth` draws, as plain data (so it can be checked without pixels).

    Returns ``{"lines": {name: {"label", "style"}}, "absent": [(name, reason)], "above_roofline":
    [(dtype, variant, n, name, fraction)], "noisy": [(dtype, variant, n)]}``.
    """
    kinds = {impl["name"]: impl["kind"] for impl in report["implementations"]}
    names = [impl["name"] for impl in report["implementations"] if impl["available"]]
    palette = plt.get_cmap("tab10").colors + plt.get_cmap("Dark2").colors
    colors = dict(zip([n for n in names if kinds[n] != "roofline"], palette))
    lines = {}
    for name in names:
        if kinds[name] == "roofline" and name == "roofline":
            lines[name] = {"label": "roofline (same streams, trivial arithmetic)",
                           "style": dict(_ROOFLINE_STYLE)}
        elif kinds[name] == "roofline":  # a compact state format's: dotted, in its row's colour
            twin = name.replace("roofline-", "fastrms-", 1)
            lines[name] = {"label": f"{name} (its streams, trivial arithmetic)",
                           "style": dict(_ROOFLINE_STYLE, linewidth=1.6, linestyle=(0, (1, 2)),
                                         color=colors.get(twin, "black"))}
        elif name == AUTO:
            chosen = report.get("machine", {}).get("automatic_choice")
            lines[name] = {"label": f"{name} (chooses {chosen})" if chosen else name,
                           "style": dict(_AUTO_STYLE, color=colors[name])}
        else:
            lines[name] = {"label": name,
                           "style": dict(_STYLE.get(kinds[name], {}), color=colors[name])}
    above = [(r["dtype"], r["variant"], r["n"], r["name"], r["fraction_of_roofline"])
             for r in report["results"]
             if kinds.get(r["name"]) != "roofline"
             and (r.get("fraction_of_roofline") or 0) > ABOVE_ROOFLINE]
    noisy = sorted({(r["dtype"], r["variant"], r["n"]) for r in report["results"]
                    if (r.get("others_busy_cores") or 0) > NOISY_CORES})
    absent = [(impl["name"], impl["reason"]) for impl in report["implementations"]
              if not impl["available"]]
    return {"lines": lines, "absent": absent, "above_roofline": above, "noisy": noisy}


def plot_bandwidth(report: dict, path) -> Path:
    """GB/s against size (log x), one panel per dtype and variant, one line per implementation;
    the roofline kernel drawn thick, black and dashed. A cell where a row beats the roofline is
    ringed in red, and the implementations that are absent are named under the legend."""
    dtypes = report["settings"]["dtypes"]
    variants = report["settings"]["variants"]
    plan = plan_bandwidth(report)
    width = max(4.6 * len(variants), 7.0)
    fig, axes = plt.subplots(len(dtypes), len(variants), squeeze=False, sharex=True,
                             figsize=(width, 3.6 * len(dtypes) + 1.6))
    handles = {}
    for i, dtype in enumerate(dtypes):
        for j, variant in enumerate(variants):
            ax = axes[i][j]
            for name, line_plan in plan["lines"].items():
                rows = sorted((r for r in report["results"] if r["name"] == name
                               and r["dtype"] == dtype and r["variant"] == variant
                               and "gb_per_s" in r), key=lambda r: r["n"])
                if not rows:
                    continue
                (line,) = ax.plot([r["n"] for r in rows], [r["gb_per_s"] for r in rows],
                                  label=line_plan["label"], **line_plan["style"])
                handles.setdefault(line_plan["label"], line)
            rates = {(r["name"], r["n"]): r["gb_per_s"] for r in report["results"]
                     if r["dtype"] == dtype and r["variant"] == variant and "gb_per_s" in r}
            for d, v, n, name, fraction in plan["above_roofline"]:
                if (d, v) == (dtype, variant):
                    (ring,) = ax.plot([n], [rates[(name, n)]], **_ABOVE_STYLE)
                    handles.setdefault("above the roofline: suspect timing", ring)
            for d, v, n in plan["noisy"]:  # timed while other processes were busy: shade
                if (d, v) == (dtype, variant):
                    band = ax.axvspan(n / 1.6, n * 1.6, color="0.88", zorder=0)
                    handles.setdefault(f"other processes busy > {NOISY_CORES} cores", band)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.grid(True, which="major", alpha=0.35)
            ax.set_title(f"{dtype}, {variant}")
            if i == len(dtypes) - 1:
                ax.set_xlabel("elements")
            if j == 0:
                ax.set_ylabel("GB/s (bytes moved / median time)")
    machine = report["machine"]
    others = report.get("others_busy_cores")
    busy = "" if others is None else f"; other processes kept {others:.2f} cores busy"
    fig.suptitle(f"fastrms update throughput: {machine['cpu_model']}, {machine['cores_usable']} "
                 f"cores, SIMD {machine['simd_level']}, {machine['threads']['fastrms']} "
                 f"thread(s), {report['date'][:10]}\n"
                 f"median of interleaved repetitions, one process{busy}", fontsize=11)
    columns = max(1, min(len(handles), int(width // 3.2)))  # legend entries are long
    fig.legend(list(handles.values()), list(handles), loc="lower center",
               bbox_to_anchor=(0.5, 0.03), ncol=columns, fontsize=9, frameon=False)
    if plan["absent"]:
        fig.text(0.5, 0.01, "absent: " + "; ".join(_short_absence(name, reason)
                                                   for name, reason in plan["absent"]),
                 ha="center", va="bottom", fontsize=8, color="0.3", wrap=True)
    rows_of_legend = -(-len(handles) // columns)
    fig.tight_layout(rect=(0, 0.05 + 0.035 * rows_of_legend, 1, 1))
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _short_absence(name: str, reason: str) -> str:
    """``torch-foreach (torch is not installed)``: the reason up to its first parenthesis."""
    return f"{name} ({reason.split(' (')[0]})"


def plot_training(history: dict, path) -> Path:
    """Loss per step, test accuracy per epoch and time per optimizer step, one colour per
    optimizer. Where runs give the same numbers the line styles (solid, dashed, dotted) let
    every curve show through.

    ``history``: optimizer name -> {"loss": [per step], "epoch_test_accuracy": [per epoch],
    "optimizer_seconds": float, "steps": int}.
    """
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4.2),
                                              gridspec_kw={"width_ratios": [1.4, 1, 0.8]})
    styles = [dict(linestyle="-", linewidth=2.6), dict(linestyle="--", linewidth=1.8),
              dict(linestyle=":", linewidth=1.8)]
    colors = ("tab:blue", "tab:orange", "tab:green", "tab:red")
    for (name, record), style, color in zip(history.items(), styles * 3, colors * 3):
        loss = np.asarray(record["loss"], dtype=float)
        left.plot(np.arange(1, loss.size + 1), loss, label=name, color=color, **style)
        accuracy = record["epoch_test_accuracy"]
        middle.plot(np.arange(1, len(accuracy) + 1), accuracy, marker="o", label=name,
                    color=color, **style)
    left.set_yscale("log")
    left.set_xlabel("step (minibatch)")
    left.set_ylabel("training loss (cross-entropy)")
    left.set_title("loss per step")
    middle.set_xlabel("epoch")
    middle.set_ylabel("test accuracy")
    middle.set_title("test accuracy per epoch")
    for ax in (left, middle):
        ax.grid(True, alpha=0.35)
        ax.legend(fontsize=9)
    names = list(history)
    per_step = [history[n]["optimizer_seconds"] / max(history[n]["steps"], 1) * 1e6 for n in names]
    bars = right.bar(names, per_step, color=colors[:len(names)])
    right.bar_label(bars, fmt="%.0f", fontsize=9)
    right.set_ylabel("microseconds per step()")
    right.set_title("time inside the optimizer")
    right.tick_params(axis="x", labelsize=9)
    fig.suptitle("MLP on scikit-learn digits: the same initial weights, batches and NumPy "
                 "gradients into each optimizer")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_paths(function, paths: dict, path, *, extent, title: str) -> Path:
    """Optimizer paths (name -> array of shape (steps + 1, 2)) over the contours of
    ``function(x, y)`` on ``extent = (xmin, xmax, ymin, ymax)``."""
    xmin, xmax, ymin, ymax = extent
    x, y = np.meshgrid(np.linspace(xmin, xmax, 400), np.linspace(ymin, ymax, 400))
    z = function(x, y)
    fig, ax = plt.subplots(figsize=(8, 5.2))
    levels = np.geomspace(max(z.min(), 1e-3), z.max(), 18)
    ax.contour(x, y, z, levels=levels, colors="0.65", linewidths=0.7)
    colors = ("tab:red", "tab:orange", "tab:blue", "tab:green")
    for k, ((name, points), color) in enumerate(zip(paths.items(), colors)):
        # Later paths on top, with smaller dots, so that paths sharing the valley floor
        # all stay visible; a square marks where each one ends.
        distance = float(np.hypot(*points[-1]))
        ax.plot(points[:, 0], points[:, 1], marker="o", markersize=4.5 - k, linewidth=1.4,
                color=color, zorder=3 + k,
                label=f"{name}: {len(points) - 1} steps, ends {distance:.2g} from the minimum")
        ax.plot(*points[-1], marker="s", markersize=8, color=color, markeredgecolor="black",
                linestyle="", zorder=10 + k)
    start = next(iter(paths.values()))[0]
    ax.plot(*start, marker="*", markersize=14, color="black", linestyle="", label="start")
    ax.plot(0, 0, marker="X", markersize=11, color="gold", markeredgecolor="black",
            linestyle="", label="minimum")
    ax.set_xlim(xmin, xmax)
    ax.set_ylim(ymin, ymax)
    ax.set_aspect("equal")
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

"""One function per figure, each returning a matplotlib Figure (or None when it has nothing to show), and
:func:`write_figures`. matplotlib's object-oriented API: no pyplot state, so nothing leaks between figures.
Imports :mod:`.runs`, :mod:`.groups` and :mod:`.tables`."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd

from ..results import write_figure
from .groups import Group
from .runs import UNTIMED, Run, as_float
from .tables import MIB, comparison_table, difference_from_baseline

MEMORY_ROLES = ("weights", "master_weights", "grads", "optimizer_state", "activations", "compensation",
                "update_workspace")  # memory.breakdown's, in the figure's order (runs before a role lack it: 0)
SOMETIMES_HELD = ("compensation", "update_workspace")  # --master-weights kahan's and stochastic's: drawn where held
DPI = 150


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _by_model(groups: list[Group]) -> dict[str, list[Group]]:
    out: dict[str, list[Group]] = {}
    for g in groups:
        out.setdefault(g.model, []).append(g)
    return out


def normalized_confusion(group: Group) -> np.ndarray:
    """The confusion matrix summed over seeds, each row (true class) divided by its count."""
    cm = sum(np.asarray(r.summary["confusion_matrix"], dtype=float) for r in group.runs)
    totals = cm.sum(axis=1, keepdims=True)
    return np.divide(cm, totals, out=np.zeros_like(cm), where=totals > 0)


WRAP = 4  # panels per row of a grid figure


def _grid(n: int, width: float, height: float):
    """A figure with ``n`` panels in rows of at most :data:`WRAP`; the unused cells are switched off."""
    ncols = min(WRAP, n)
    nrows = math.ceil(n / ncols)
    fig = _figure(width * ncols + 1.0, height * nrows + 0.6)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_axis_off()
    return fig, axes[:n]


def _confusion_panel(ax, matrix: np.ndarray, classes: list[str], title: str, *, vmin: float, vmax: float,
                     cmap: str, fmt: str):
    from sklearn.metrics import ConfusionMatrixDisplay

    shown = ConfusionMatrixDisplay(matrix, display_labels=classes).plot(
        ax=ax, values_format=fmt, colorbar=False, cmap=cmap, xticks_rotation=45,
        im_kw={"vmin": vmin, "vmax": vmax}, text_kw={"fontsize": 6})
    middle = (vmin + vmax) / 2
    for (i, j), text in np.ndenumerate(shown.text_):  # contrast against the shared scale
        strong = abs(matrix[i, j] - middle) > 0.5 * (vmax - vmin) / 2 if cmap != "Blues" else matrix[i, j] > middle
        text.set_color("white" if strong else "black")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.tick_params(labelsize=7)
    for label in ax.get_xticklabels():  # rotated names end under their column
        label.set(ha="right", rotation_mode="anchor")
    return shown.im_


def confusion_figure(groups: list[Group]):
    """One normalized confusion matrix per group, in rows of at most :data:`WRAP` panels."""
    classes = list(groups[0].runs[0].summary["per_class_accuracy"])
    fig, axes = _grid(len(groups), 4.8, 4.6)
    for ax, g in zip(axes, groups):
        title = textwrap.fill(f"{g.title} (n={g.n})", 52)
        image = _confusion_panel(ax, 100 * normalized_confusion(g), classes, title, vmin=0.0, vmax=100.0,
                                 cmap="Blues", fmt=".0f")
    fig.colorbar(image, ax=list(axes), shrink=0.6, label="% of the true class")
    fig.suptitle("Test-set confusion matrices, summed over seeds, normalized per true class")
    return fig


def confusion_difference_figure(groups: list[Group]):
    """Each group's normalized confusion matrix minus its FP32 baseline's, in percentage points, over the seeds
    both ran (so that the two sides are the same initial weights and batches): on the diagonal, how much more
    (blue) or less (red) of each class a mode gets right; off it, which confusions it adds. None when no group
    has a baseline with shared seeds."""
    from .groups import find_baseline

    pairs = []
    for g in groups:
        base = find_baseline(g, groups)
        if base is None or base is g:
            continue
        seeds = sorted({r.seed for r in g.runs} & {r.seed for r in base.runs})
        if seeds:
            pairs.append((g, base, seeds))
    if not pairs:
        return None
    classes = list(groups[0].runs[0].summary["per_class_accuracy"])
    diffs = [100 * (normalized_confusion(g.subset(seeds)) - normalized_confusion(base.subset(seeds)))
             for g, base, seeds in pairs]
    bounds = {}  # one colour scale per model: one model's large differences must not wash out another's
    for (g, _, _), d in zip(pairs, diffs):
        bounds[g.model] = max(bounds.get(g.model, 1.0), float(np.abs(d).max()))
    fig, axes = _grid(len(pairs), 5.4, 4.6)
    for ax, (g, _, seeds), diff in zip(axes, pairs, diffs):
        title = textwrap.fill(f"{g.title} minus FP32 (seeds {', '.join(map(str, seeds))})", 52)
        image = _confusion_panel(ax, diff, classes, title, vmin=-bounds[g.model], vmax=bounds[g.model], cmap="RdBu",
                                 fmt="+.1f")
        fig.colorbar(image, ax=ax, shrink=0.7, label="percentage points of the true class")
    fig.suptitle("Confusion matrices minus FP32's, paired by seed")
    return fig


def prediction_flips(run: Run, base: Run) -> dict[str, float] | None:
    """Shares of the test images whose prediction differs between ``run`` and ``base`` (two runs of one seed, or
    two seeds), split by what the change did: ``lost`` (``base`` right, ``run`` wrong), ``gained`` (the other
    way) and ``other`` (wrong both times, differently). None without predictions for the same images."""
    a, b = run.predictions, base.predictions
    if a is None or b is None or len(a) != len(b) or not (a["label"].to_numpy() == b["label"].to_numpy()).all():
        return None
    label, mine, theirs = a["label"].to_numpy(), a["prediction"].to_numpy(), b["prediction"].to_numpy()
    changed = mine != theirs
    return {"lost": float(np.mean(changed & (theirs == label))), "gained": float(np.mean(changed & (mine == label))),
            "other": float(np.mean(changed & (mine != label) & (theirs != label)))}


def accuracy_diff_figure(groups: list[Group]):
    """A forest plot: each group's test accuracy minus its FP32 baseline's, in pp, a row per group and a panel
    per model, with its 95% interval (filled: paired by seed; open: Welch's; open without a bar: one seed) and
    the numbers written beside it. The axis spans the groups with three or more seeds, so that a two-seed
    interval (t with 1 degree of freedom, several times wider) does not squash the rest; a bar it cuts ends
    in an arrow. None when no group has a baseline to compare with."""
    from matplotlib.lines import Line2D
    from matplotlib.transforms import blended_transform_factory

    table = comparison_table(groups)
    per_model: dict[str, list] = {}
    for row, g in zip(table.itertuples(), groups):
        if not pd.isna(row.accuracy_diff_pp):
            per_model.setdefault(g.model, []).append((g, row.n, *difference_from_baseline(row)))
    if not per_model:
        return None
    values = [v for rows in per_model.values() for _, n, x, lo, hi, _ in rows if n >= 3 for v in (x, lo, hi)]
    values += [x for rows in per_model.values() for _, _, x, _, _, _ in rows]
    values = [abs(v) for v in values if not math.isnan(v)]
    lim = 1.15 * max(values + [0.5])
    palette = _palette(groups)
    fig = _figure(10.5, 0.9 + sum(0.55 + 0.3 * len(rows) for rows in per_model.values()))
    axes = fig.subplots(len(per_model), 1, squeeze=False, height_ratios=[len(r) + 1.5 for r in per_model.values()])
    for ax, (model, rows) in zip(axes[:, 0], per_model.items()):
        beside = blended_transform_factory(ax.transAxes, ax.transData)
        for y, (g, n, x, lo, hi, source) in enumerate(rows):
            colour = palette[g.short]
            face = colour if source == "paired" else "white"
            if not math.isnan(lo):
                ax.plot([max(lo, -lim), min(hi, lim)], [y, y], color=colour, lw=1.5)
                for end, edge, arrow in ((lo, -lim, "<"), (hi, lim, ">")):
                    if abs(end) > lim and (end < 0) == (edge < 0):
                        ax.plot(edge, y, marker=arrow, color=colour, ms=6)
            ax.plot(x, y, marker="o", ms=6, color=colour, mfc=face, ls="none")
            numbers = f"{x:+.2f}" + ("" if math.isnan(lo) else f" [{lo:+.2f}, {hi:+.2f}]")
            ax.text(1.02, y, numbers, transform=beside, va="center", fontsize=8)
        ax.axvline(0, color="0.3", lw=0.8)
        ax.set_yticks(range(len(rows)), [f"{g.short} (n = {n})" for g, n, *_ in rows], fontsize=8)
        ax.set_ylim(len(rows) - 0.5, -0.5)
        ax.set_xlim(-lim, lim)
        ax.set_title(model, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    axes[-1, 0].set_xlabel("test accuracy minus FP32's (pp), with its 95% interval")
    kinds = {r[5] for rows in per_model.values() for r in rows}
    handles = [Line2D([], [], color="0.3", marker="o", mfc=face, ls="-" if bar else "none", label=label)
               for kind, face, bar, label in (("paired", "0.3", True, "paired by seed (t, n - 1 df)"),
                                              ("welch", "white", True, "Welch, unpaired"),
                                              ("one seed", "white", False, "one seed: no interval"))
               if kind in kinds]
    fig.legend(handles=handles, fontsize=8, loc="outside lower center", ncols=len(handles))
    return fig


def flips_figure(groups: list[Group]):
    """Per group, the share of test images whose prediction differs from FP32's on the same seed (same initial
    weights and batches), stacked by what changed, mean over the paired seeds (dots: each seed's total); beside
    it, as the noise floor, the share that differs between two FP32 runs of different seeds. None when no pair
    of runs has predictions."""
    from itertools import combinations

    from .groups import find_baseline

    palette, rows = _palette(groups), []
    for g in groups:
        base = find_baseline(g, groups)
        if base is None or base is g:
            continue
        by_seed = {r.seed: r for r in base.runs}
        flips = [f for r in g.runs if r.seed in by_seed and (f := prediction_flips(r, by_seed[r.seed])) is not None]
        if flips:
            floor = [f for a, b in combinations(base.runs, 2) if (f := prediction_flips(a, b)) is not None]
            rows.append((g, flips, floor))
    if not rows:
        return None
    fig = _figure(9.0, 1.4 + 0.45 * len(rows))
    ax = fig.subplots()
    y = np.arange(len(rows))
    left = np.zeros(len(rows))
    for part, colour, what in (("lost", "tab:red", "FP32 right, mode wrong"),
                               ("gained", "tab:blue", "FP32 wrong, mode right"),
                               ("other", "0.6", "wrong both times, differently")):
        widths = np.array([100 * np.mean([f[part] for f in flips]) for _, flips, _ in rows])
        ax.barh(y, widths, left=left, color=colour, label=what, alpha=0.85)
        left += widths
    for i, (g, flips, floor) in enumerate(rows):
        ax.plot([100 * sum(f.values()) for f in flips], [i] * len(flips), "o", color=palette[g.short], mec="k", ms=4)
        if floor:
            ax.plot([100 * np.mean([sum(f.values()) for f in floor])] * 2, [i - 0.4, i + 0.4], color="k", lw=2,
                    label="FP32 against FP32 of another seed" if i == 0 else None)
    ax.set_yticks(y, [f"{g.title} (n={len(flips)})" for g, flips, _ in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("test images whose prediction differs from FP32's on the same seed (%)")
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    fig.legend(fontsize=8, loc="outside lower center", ncols=2)
    return fig


def _palette(groups: list[Group]) -> dict[str, str]:
    """One colour per mode label (the same in every model's panels); tab20 when tab10 would repeat."""
    from matplotlib import colormaps

    shorts = list(dict.fromkeys(g.short for g in groups))
    cmap = colormaps["tab10" if len(shorts) <= 10 else "tab20"]
    return {short: cmap(i % cmap.N) for i, short in enumerate(shorts)}


def curves_figure(groups: list[Group]):
    """Loss and accuracy per epoch: train solid, validation dashed, mean over seeds, min..max shaded."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    per_model, palette = _by_model(groups), _palette(groups)
    fig = _figure(11.0, 3.6 * len(per_model))
    axes = fig.subplots(len(per_model), 2, squeeze=False)
    smoothed = any(r.config.get("label_smoothing") for g in groups for r in g.runs)
    for (ax_loss, ax_acc), (model, model_groups) in zip(axes, per_model.items()):
        nan_marked = False
        epochs = pd.concat([r.epochs for g in model_groups for r in g.runs])["epoch"]
        span = (epochs.min() - 0.5, epochs.max() + 0.5)  # a one-epoch run is still a readable point at 1
        for g in model_groups:
            epochs = pd.concat([r.epochs for r in g.runs])
            for ax, metric, scale in ((ax_loss, "loss", 1.0), (ax_acc, "acc", 100.0)):
                for split, style, marker in (("train", "-", "o"), ("val", "--", "s")):
                    stats = epochs.groupby("epoch")[f"{split}_{metric}"].agg(["mean", "min", "max"]) * scale
                    ax.plot(stats.index, stats["mean"], style, color=palette[g.short], lw=1.5,
                            marker=marker if len(stats) <= 15 else None, ms=3)
                    if g.n > 1:
                        ax.fill_between(stats.index, stats["min"], stats["max"], color=palette[g.short], alpha=0.15,
                                        lw=0)
                    lost = epochs.loc[~np.isfinite(epochs[f"{split}_{metric}"].astype(float)), "epoch"].unique()
                    for epoch in lost:  # a NaN or inf loss (an FP16 evaluation that overflowed): marked, not dropped
                        ax.axvline(epoch, color=palette[g.short], ls=":", lw=1)
                        ax.plot([epoch], [0], marker="X", color="red", ms=7, clip_on=False, zorder=4)
                        nan_marked = True
        for ax, what, unit in ((ax_loss, "loss", "cross-entropy loss"), (ax_acc, "accuracy", "accuracy (%)")):
            ax.set_title(f"{model}: {what}")
            ax.set_xlabel("epoch")
            ax.set_ylabel(unit)
            ax.set_xlim(span)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
            ax.grid(alpha=0.3)
        handles = [Line2D([], [], color=palette[g.short], label=g.short) for g in model_groups]
        handles += [Line2D([], [], color="0.3", ls="-", marker="o", ms=3,
                           label="train" + (" (loss with label smoothing)" if smoothed else "")),
                    Line2D([], [], color="0.3", ls="--", marker="s", ms=3, label="validation")]
        if nan_marked:
            handles.append(Line2D([], [], color="red", marker="X", ls="", label="NaN or inf (not drawn)"))
        ax_acc.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # off the data
    return fig


def time_to_accuracy_figure(groups: list[Group]):
    """Validation accuracy against training wall-clock time (evaluation excluded), a panel per model: each
    group's mean over seeds at the end of every epoch, with the seeds' min..max accuracy shaded. Time on a
    CPU says nothing about a GPU (docs/gpu.md); each line is one environment's."""
    from matplotlib.lines import Line2D

    if not any(g.timed_runs for g in groups):  # the study's times are not a result: no figure pretends they are
        return None
    per_model, palette = _by_model(groups), _palette(groups)
    ncols = min(2, len(per_model))
    fig = _figure(7.6 * ncols, 3.8 * math.ceil(len(per_model) / ncols))
    axes = fig.subplots(math.ceil(len(per_model) / ncols), ncols, squeeze=False).ravel()
    for ax, (model, model_groups) in zip(axes, per_model.items()):
        timed = [g for g in model_groups if g.timed_runs]
        for g in timed:
            curves = []
            for r in g.timed_runs:
                e = r.epochs.sort_values("epoch")
                curves.append(pd.DataFrame({"epoch": e["epoch"], "time": e["epoch_time_s"].cumsum(),
                                            "acc": 100.0 * e["val_acc"]}))
            stats = pd.concat(curves).groupby("epoch").agg(time=("time", "mean"), mean=("acc", "mean"),
                                                           low=("acc", "min"), high=("acc", "max"))
            ax.plot(stats["time"], stats["mean"], color=palette[g.short], lw=1.5,
                    marker="o" if len(stats) <= 15 else None, ms=3)
            if len(g.timed_runs) > 1:
                ax.fill_between(stats["time"], stats["low"], stats["high"], color=palette[g.short], alpha=0.15, lw=0)
        ax.set_title(f"{model}: validation accuracy against training time")
        ax.set_xlabel("training time (s, evaluation excluded)")
        ax.set_ylabel("validation accuracy (%)")
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
        if timed:
            ax.legend(handles=[Line2D([], [], color=palette[g.short], label=f"{g.short} (n={len(g.timed_runs)})")
                               for g in timed], fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
        else:
            ax.text(0.5, 0.5, f"no timed run ({UNTIMED} names them all)", transform=ax.transAxes, ha="center")
    for ax in axes[len(per_model):]:
        ax.set_axis_off()
    return fig


def measured(group: Group, column: str) -> bool:
    """Whether any of the group's runs recorded a value in this ``steps.csv`` column."""
    return any(r.steps is not None and column in r.steps and r.steps[column].notna().any() for r in group.runs)


def has_loss_scale(group: Group) -> bool:
    """Whether any of the group's runs recorded a loss scale (bfloat16 amp and baseline have none)."""
    return group.mode != "baseline" and measured(group, "loss_scale")


def loss_scale_figure(groups: list[Group]):
    """The loss scale per optimizer step (log2 axis), one panel per model, environment and seed with the
    scaled variants overlaid (GradScaler in amp, ours in manual), skipped steps as red crosses; None when no
    group has a loss scale."""
    from matplotlib.ticker import MaxNLocator

    scaled = [g for g in groups if has_loss_scale(g)]
    if not scaled:
        return None
    palette = _palette(groups)
    panels: dict[tuple, list[tuple[Group, Run]]] = {}
    for g in scaled:
        for run in g.runs:
            if run.steps is not None:
                panels.setdefault((g.model, g.environment, run.seed), []).append((g, run))
    environments = {g.environment for g in scaled}
    ncols = min(2, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = _figure(6.4 * ncols, 3.4 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, ((model, environment, seed), lines) in zip(axes, sorted(panels.items())):
        marked = False
        for g, run in lines:
            steps = run.steps.dropna(subset=["loss_scale"])
            ax.plot(steps["step"], steps["loss_scale"], color=palette[g.short], lw=1.2, drawstyle="steps-post",
                    ls="--" if g.loss_scaler == "GradScaler" else "-",
                    zorder=3 if g.loss_scaler == "GradScaler" else 2,  # dashed on top: seen
                    # where the two scalers agree
                    label=f"{g.short} ({_scaler_name(g)})")
            skipped = steps[steps["skipped"]]
            if len(skipped):
                ax.plot(skipped["step"], skipped["loss_scale"], "x", color="red", ms=6, mew=1.5,
                        label=None if marked else "skipped step")
                marked = True
        ax.set_yscale("log", base=2)
        last = max(run.steps["step"].max() for _, run in lines)
        first_skip = min((run.steps.loc[run.steps["skipped"], "step"].min() for _, run in lines
                          if run.steps["skipped"].any()), default=None)
        if first_skip is not None and first_skip <= 0.02 * last:  # early skips: a log axis keeps them apart
            ax.set_xscale("log")
            ax.set_xlabel("optimizer step (log scale: the skips come early)")
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
            ax.set_xlabel("optimizer step")
        ax.set_title(f"{model}, seed {seed}" + (f" ({environment})" if len(environments) > 1 else ""), fontsize=10)
        ax.set_ylabel("loss scale")
        ax.grid(alpha=0.3)
    for ax in axes[len(panels):]:
        ax.set_axis_off()
    legend = {}  # one entry per group (and for the skip marker) over all panels: a group has one colour in all
    for ax in axes:
        legend.update((label, handle) for handle, label in zip(*ax.get_legend_handles_labels()))
    fig.legend(legend.values(), legend.keys(), fontsize=8, loc="outside lower center", ncols=min(2, len(legend)))
    return fig


SCALER_NAMES = {"GradScaler": "torch.amp.GradScaler", "dynamic": "DynamicLossScaler", "static": "static loss scale",
                "none": "no loss scaling"}  # summary.json's loss_scaler, as a legend says it


def _scaler_name(group: Group) -> str:
    """What set the group's loss scale, as its runs' summaries record it."""
    return SCALER_NAMES.get(group.loss_scaler, str(group.loss_scaler))


def memory_means(group: Group) -> dict[str, float]:
    """Mean MiB per memory role over the runs that measured it (0 where none did, or for a role a run predates)."""
    measured = [r.summary.get("memory") for r in group.runs if isinstance(r.summary.get("memory"), dict)]
    return {role: float(np.mean([as_float(m.get(role, 0)) for m in measured])) / MIB if measured else 0.0
            for role in MEMORY_ROLES}


def memory_figure(groups: list[Group]):
    """Left: a stacked bar per group of the mean memory by role; right: the mean peak memory."""
    fig = _figure(11.5, 1.6 + 0.45 * len(groups))
    ax_roles, ax_peak = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [3, 2]})
    y = np.arange(len(groups))
    left = np.zeros(len(groups))
    means = [memory_means(g) for g in groups]
    for i, role in enumerate(MEMORY_ROLES):
        widths = np.array([m[role] for m in means])
        if role in SOMETIMES_HELD and not widths.any():
            continue
        ax_roles.barh(y, widths, left=left, color=f"C{i}", label=role.replace("_", " "))
        left += widths
    ax_roles.set_yticks(y, [g.title for g in groups], fontsize=8)
    ax_roles.invert_yaxis()
    ax_roles.set_xlabel("MiB (mean over seeds, measured on the first training step taken)")
    ax_roles.set_title("memory by role")
    peaks = np.array([g.values("peak_memory_bytes").mean() / MIB for g in groups])
    on_cpu = np.array([any(r.on_cpu for r in g.runs) for g in groups])
    for mask, label, color in ((on_cpu, "peak RSS (CPU process)", "0.55"), (~on_cpu, "peak (device)", "0.25")):
        if mask.any():
            ax_peak.barh(y[mask], peaks[mask], color=color, label=label)
    ax_peak.set_xlabel("MiB (mean over seeds)")
    ax_peak.set_title("peak memory")
    handles = [h for ax in (ax_roles, ax_peak) for h in ax.get_legend_handles_labels()[0]]
    fig.legend(handles=handles, fontsize=8, loc="outside lower center", ncols=len(handles))  # below, off the bars
    for ax in (ax_roles, ax_peak):
        ax.grid(axis="x", alpha=0.3)
        ax.set_axisbelow(True)
    return fig


def fp8_figure(groups: list[Group]):
    """FP8 telemetry per optimizer step: rows saturated fraction, flushed-to-zero fraction and scale (geometric
    mean over the FP8 layers), columns weights, activations, gradients; one colour per group, one line per seed.
    None when no group trained in FP8."""
    from ..fp8 import ROLES, STATS

    fp8 = [g for g in groups if measured(g, "fp8_grad_scale")]  # --fp8
    if not fp8:
        return None
    palette = _palette(groups)
    fig = _figure(13.0, 8.0)
    axes = fig.subplots(len(STATS), len(ROLES), sharex=True, squeeze=False)
    for g in fp8:
        for k, run in enumerate(r for r in g.runs if r.steps is not None):
            steps = run.steps.dropna(subset=["fp8_grad_scale"])
            for row, stat in enumerate(STATS):
                for col, role in enumerate(ROLES):
                    factor = 100.0 if row < 2 else 1.0  # the fractions in percent, as telemetry.md gives them
                    axes[row][col].plot(steps["step"], factor * steps[f"fp8_{role}_{stat}"], color=palette[g.short],
                                        lw=1, label=g.title if k == 0 else None)
    for col, role in enumerate(("weights (E4M3)", "activations (E4M3)", "gradients (E5M2)")):
        axes[0][col].set_title(role, fontsize=10)
        axes[-1][col].set_xlabel("optimizer step")
        for row in range(len(STATS)):
            ax = axes[row][col]
            values = np.concatenate([np.asarray(line.get_ydata(), dtype=float) for line in ax.lines])
            values = values[np.isfinite(values)]
            if row < 2:  # a fraction: zero stays on the axis, which starts there
                ax.set_yscale("symlog", linthresh=1e-4)
                ax.set_ylim(0, max(2 * values.max(initial=0.0), 1e-3))
            else:  # a scale: whole powers of two at both ends, so the axis always has labelled ticks
                ax.set_yscale("log", base=2)
                positive = values[values > 0]
                if positive.size:
                    low, high = math.log2(positive.min()), math.log2(positive.max())
                    ax.set_ylim(2.0 ** math.floor(low), 2.0 ** math.ceil(high))
            ax.grid(alpha=0.3)
    for row, label in enumerate(("saturated (% of elements)", "flushed to zero (%)", "scale (geometric mean)")):
        axes[row][0].set_ylabel(label)
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="outside lower center", fontsize=8,
               ncols=min(4, len(fp8)))
    return fig


MASTER_COLOURS = {"none": "C3", "stochastic": "C0", "kahan": "C2"}  # what replaces FP32 master weights
LOST_LINES = (("update_lost_frac", "-", "updates lost"), ("decay_lost_frac", ":", "weight decays lost"),
              ("update_lost_nearest_frac", "-.", "updates nearest rounding would lose"))


def lost_updates_figure(groups: list[Group]):
    """Without FP32 master weights: the fraction of nonzero SGD updates and of weight decays that rounding to the
    weights' precision swallowed, per measured step, one line per seed, with the learning rate on a second
    axis (the lost fraction grows as the lr falls); with stochastic rounding or Kahan compensation, what
    rounding the same updates to nearest would have lost beside it. One panel per weight precision
    (``--manual-dtype``), one colour per kind of ``--master-weights`` (per group where a kind repeats in a panel),
    one line style per fraction. None when no group measured it."""
    from matplotlib.lines import Line2D

    lossy = [g for g in groups if measured(g, "update_lost_frac")]  # --master-weights none, stochastic, kahan
    if not lossy:
        return None
    panels: dict[str, list[Group]] = {}
    for g in lossy:
        panels.setdefault(str(g.setting.get("manual_dtype") or "float16"), []).append(g)
    kinds = [(dtype, str(g.setting.get("master_weights"))) for dtype, members in panels.items() for g in members]
    by_kind = len(set(kinds)) == len(kinds) and all(kind in MASTER_COLOURS for _, kind in kinds)
    palette = _palette(groups)
    colour = {g.title: MASTER_COLOURS[str(g.setting.get("master_weights"))] if by_kind else palette[g.short]
              for g in lossy}
    fig = _figure(4.8 * len(panels) + 1.2, 4.6)
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    lr_axes = [ax.twinx() for ax in axes]
    styles_drawn = {}
    for ax, lr_axis, (dtype, members) in zip(axes, lr_axes, panels.items()):
        for i, g in enumerate(members):
            for k, run in enumerate(r for r in g.runs if r.steps is not None and "update_lost_frac" in r.steps):
                steps = run.steps.dropna(subset=["update_lost_frac"])
                for column, style, what in LOST_LINES:
                    if column in steps and steps[column].notna().any():
                        ax.plot(steps["step"], 100 * steps[column], color=colour[g.title], lw=1, ls=style,
                                alpha=0.8, label=f"{g.title}: {what}" if k == 0 else None)
                        styles_drawn[style] = what
                lr_axis.plot(run.steps["step"], run.steps["lr"], color="0.5", lw=0.8, ls="--",
                             label="learning rate" if i == k == 0 else None)
        ax.set_title(f"{dtype} weights", fontsize=10)
        ax.set_ylim(0, 105)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        lr_axis.set_ylim(bottom=0)
    axes[0].set_ylabel("lost to rounding (% of nonzero)")
    lr_axes[-1].set_ylabel("learning rate")
    for lr_axis in lr_axes[:-1]:
        lr_axis.tick_params(labelright=False)
    if by_kind:  # in MASTER_COLOURS's order: none, then its cures
        kinds_drawn = {kind for _, kind in kinds}
        named = {f"master weights {kind}": c for kind, c in MASTER_COLOURS.items() if kind in kinds_drawn}
    else:
        named = {g.title: colour[g.title] for g in lossy}
    handles = [Line2D([], [], color=c, lw=2, label=name) for name, c in named.items()]
    handles += [Line2D([], [], color="0.3", lw=1, ls=style, label=what) for style, what in styles_drawn.items()]
    handles.append(Line2D([], [], color="0.5", lw=0.8, ls="--", label="learning rate (right axis)"))
    fig.legend(handles=handles, fontsize=8, loc="outside lower center", ncols=2 if by_kind else 1)
    return fig


LAYER_PANELS = (  # layer_grads.csv's statistics drawn, with their colour-bar labels and how they are shown
    ("zero_frac", "zero as computed (%)", 100.0),
    ("fp16_underflow_frac", "nonzero, but 0 in FP16 at scale 1 (%)", 100.0),
    ("headroom_log2", "headroom to FP16's 65504\nat the step's scale (binades)", 1.0),
)
LAYER_TENSORS = ("activation", "weight")


def layer_grid(runs: list[Run], tensor: str, statistic: str) -> pd.DataFrame:
    """One statistic of ``tensor`` gradients as a layer x step frame (layers in network order), the mean over
    ``runs`` (seeds of one group measure the same steps and layers); an all-zero gradient's infinite headroom
    is left blank."""
    frames = [r.layers[(r.layers.tensor == tensor) & (r.layers.statistic == statistic)]
              for r in runs if r.layers is not None]
    rows = pd.concat(frames)
    order = list(dict.fromkeys(rows.layer))
    grid = rows.replace([np.inf], np.nan).pivot_table(index="layer", columns="step", values="value", aggfunc="mean",
                                                      dropna=False)
    return grid.reindex(order)


def layer_grads_figure(groups: list[Group], tensor: str = "activation"):
    """A layer x step heatmap per group with ``--layer-stats-every`` runs (rows of panels) and per statistic of
    :data:`LAYER_PANELS` (columns), for the ``tensor`` gradients; one colour scale per column, shared by the
    groups, so that the rows compare. None when no run measured it."""
    from matplotlib.colors import Normalize, TwoSlopeNorm

    measured = [g for g in groups if any(r.layers is not None for r in g.runs)]
    if not measured:
        return None
    grids = {(g.title, stat): layer_grid(g.runs, tensor, stat) * factor
             for g in measured for stat, _, factor in LAYER_PANELS}
    layers = max(len(grid) for grid in grids.values())
    fig = _figure(4.4 * len(LAYER_PANELS) + 1.5, max(2.6, 1.2 + 0.022 * layers) * len(measured) + 0.6)
    axes = fig.subplots(len(measured), len(LAYER_PANELS), squeeze=False)
    for col, (stat, label, _) in enumerate(LAYER_PANELS):
        values = np.concatenate([grids[g.title, stat].to_numpy().ravel() for g in measured])
        finite = values[np.isfinite(values)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        if stat == "headroom_log2" and lo < 0 < hi:  # below 0 it overflowed: diverge around it
            norm, cmap = TwoSlopeNorm(0.0, lo, hi), "RdBu"
        else:
            norm, cmap = Normalize(0.0 if stat != "headroom_log2" else lo, max(hi, 1e-9)), "viridis"
        for row, g in enumerate(measured):
            ax, grid = axes[row][col], grids[g.title, stat]
            steps = grid.columns.to_numpy(dtype=float)
            edges = (np.concatenate([[steps[0] - 0.5], (steps[1:] + steps[:-1]) / 2, [steps[-1] + 0.5]])
                     if len(steps) > 1 else np.array([steps[0] - 0.5, steps[0] + 0.5]))
            mesh = ax.pcolormesh(edges, np.arange(len(grid) + 1), grid.to_numpy(), norm=norm, cmap=cmap)
            ax.set_ylim(len(grid), 0)  # the first layer on top
            every = max(1, math.ceil(len(grid) / 24))
            ax.set_yticks(np.arange(0, len(grid), every) + 0.5, grid.index[::every], fontsize=5)
            ax.set_xlabel("optimizer step", fontsize=8)
            ax.tick_params(axis="x", labelsize=7)
            ax.set_title(g.title if col == 0 else "", fontsize=8, loc="left")
        fig.colorbar(mesh, ax=[axes[r][col] for r in range(len(measured))], label=label, shrink=0.9,
                     location="bottom", aspect=30)
    fig.suptitle(f"{tensor} gradients, layer by layer (--layer-stats-every; mean over seeds)", fontsize=10)
    return fig


CAPTIONS = {
    "confusion_matrices.png": "Test-set confusion matrices per group, summed over seeds and normalized per true "
                              "class (each row sums to 1).",
    "confusion_difference.png": "Each mode's normalized test confusion matrix minus its FP32 baseline's, over the "
                                "seeds both ran, in percentage points of the true class: the diagonal is each "
                                "class's accuracy gained (blue) or lost (red), the rest the confusions added or "
                                "removed; one colour scale per model. With few seeds, differences of a few points are "
                                "within seed noise.",
    "accuracy_diff.png": "Each mode's test accuracy minus FP32's (same model and settings), in percentage "
                         "points, with its 95% confidence interval: filled, the paired t-test over the seeds both "
                         "ran; open, Welch's unpaired test; no bar, one seed. An interval that crosses 0 cannot "
                         "tell the mode from FP32. The axis spans the modes with three or more seeds; a wider "
                         "interval it cuts ends in an arrow, and its numbers stand beside it.",
    "prediction_flips.png": "The share of test images whose predicted class differs from FP32's, run against "
                            "FP32 of the same seed (the same initial weights and batches), split into images FP32 "
                            "got right and the mode wrong (red), the reverse (blue), and images both got wrong "
                            "differently (grey); bars are means over the paired seeds, dots each seed's total. The "
                            "black mark is the share that differs between two FP32 runs of different seeds: the "
                            "changes that any retraining makes.",
    "curves.png": "Training (solid) and validation (dashed) loss and accuracy per epoch, mean over seeds with the "
                  "min..max range of the seeds shaded.",
    "time_to_accuracy.png": "Validation accuracy against training wall-clock time (evaluation excluded) at the end "
                            "of each epoch, mean over seeds with the min..max range of the seeds shaded. Times are "
                            "those of the machine each group ran on; on a CPU they say nothing about a GPU. Runs whose times "
                            f"{UNTIMED} names are left out (n counts the runs drawn).",
    "loss_scale.png": "The loss scale at every optimizer step (log2 axis), one panel per seed: PyTorch's GradScaler "
                      "(amp) and ours (manual) overlaid; red crosses mark the steps skipped on overflow.",
    "memory.png": "Mean memory by role, measured on the first training step that was not skipped (left), and the mean peak memory "
                  "(right; on a CPU the process's peak resident memory).",
    "fp8.png": "FP8 telemetry (--fp8) at the measured steps (every --telemetry-every): the fraction "
               "of elements saturated (where a plain cast would have overflowed), the fraction flushed to zero "
               "(nonzero in, zero out), over all FP8 layers, and the geometric mean of their scales, for weights "
               "and activations (E4M3) and output gradients (E5M2, which include the loss scale).",
    "lost_updates.png": "Without FP32 master weights (--master-weights none, stochastic, kahan), at the measured "
                        "steps: the percentage of nonzero SGD updates for which w - lr * d rounded back to w in the "
                        "weights' precision (solid; with kahan, where neither the weight nor its compensation "
                        "moved), and with none of nonzero weights whose weight decay alone, w * (1 - lr * wd), "
                        "rounded back to w (dotted); with stochastic and kahan, the percentage that rounding the "
                        "same updates to nearest would have lost (dash-dotted); with the learning rate (dashed, "
                        "right axis); one line per seed, one panel per weight precision, one colour per kind.",
    "layer_grads_activation.png": "Per layer (rows, in network order) and measured step (columns), the gradient "
                                  "w.r.t. each Conv2d, BatchNorm and Linear layer's output (--layer-stats-every, "
                                  "mean over seeds): the percentage of elements that are zero as the backward pass "
                                  "computed them (what FP16 flushed, and the zeros behind a ReLU that was off), "
                                  "the percentage that are nonzero but would be 0 in FP16 without the loss scale "
                                  "(what the scale kept), and the headroom, in binades, between the largest "
                                  "scaled gradient and FP16's 65504 (below 0: it overflowed). One colour scale "
                                  "per column, shared by the rows.",
    "layer_grads_weight.png": "The same for each layer's weight gradient.",
}


def write_figures(out: Path, groups: list[Group]) -> list[str]:
    """Write the PNGs (dpi 150); return the names written (loss_scale.png only when a group has a scale)."""
    written = []
    for name, make in (("accuracy_diff.png", accuracy_diff_figure), ("confusion_matrices.png", confusion_figure),
                       ("confusion_difference.png", confusion_difference_figure),
                       ("prediction_flips.png", flips_figure), ("curves.png", curves_figure),
                       ("time_to_accuracy.png", time_to_accuracy_figure), ("loss_scale.png", loss_scale_figure),
                       ("memory.png", memory_figure), ("fp8.png", fp8_figure),
                       ("lost_updates.png", lost_updates_figure),
                       *((f"layer_grads_{t}.png", lambda gs, t=t: layer_grads_figure(gs, t)) for t in LAYER_TENSORS)):
        fig = make(groups)
        if fig is None:
            (out / name).unlink(missing_ok=True)  # an earlier report's figure would contradict this one
            continue
        write_figure(out / name, fig)
        written.append(name)
    return written

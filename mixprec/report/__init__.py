"""``python -m mixprec.report RESULTS_DIR [--out DIR]``: every run under RESULTS_DIR as tables and figures.

Finds the run directories under ``RESULTS_DIR`` (any directory holding ``config.json`` or
``summary.json``), counts the completed ones, and groups runs that differ only in their seed. A group is
one model in one mode with one set of options on one environment (device and torch version): runs
from different machines are never averaged together. Each group is compared with the baseline of the
same model, environment and training settings: speedup, memory ratio, accuracy difference with Welch's
t-test over seeds, and the paired t-test over the seeds both ran. Failed, interrupted and unreadable runs
are not counted; they are named on stderr and in the report.

Writes to ``--out`` (default ``RESULTS_DIR/report``), every file atomically:

- ``comparison.md``/``.csv``: one row per group (the CSV keeps raw numbers: means, stds and n apart);
- ``grid.md``/``.csv``: mean final validation accuracy per lr/momentum/weight-decay combination and
  model, when the runs vary those (the CSV is long: one row per cell, with a boolean ``best``);
- ``per_class_accuracy.md``/``.csv``: per-class test accuracy per group, the mean over seeds with its 95% t
  interval (the CSV in fractions);
- ``inference.md``: the inference benchmark's rows, when ``RESULTS_DIR/bench_infer.csv`` exists
  (``python -m mixprec.bench_infer`` writes it there with ``--out``; its default is ``results/``);
- ``confusion_matrices.png``, ``curves.png``, ``time_to_accuracy.png``, ``loss_scale.png`` (when a group has
  a loss scale) and ``memory.png``;
- ``report.md``: one page with the environments, the counted and uncounted runs, the tables and the figures.

Example::

    python -m mixprec.report results            # writes results/report/
    python -m mixprec.report results --out docs/report

The package, in import order: each module imports only the ones above it.

- ``runs``: finding, loading and validating run directories (:func:`load_results`);
- ``groups``: grouping runs that differ only in seed, their labels, and each group's baseline;
- ``tables``: statistics over seeds and the comparison, grid, per-class and inference tables;
- ``figures``: one function per figure, and :func:`write_figures`;
- ``build``: report.md, :func:`make_report` and the command line's :func:`main`.

``__main__`` only calls ``build.main``.
"""

from .build import main, make_report
from .figures import fp8_figure, loss_scale_figure, lost_updates_figure, time_to_accuracy_figure
from .groups import group_runs
from .runs import load_results
from .tables import comparison_markdown, comparison_table, grid_markdown, grid_table

__all__ = ["comparison_markdown", "comparison_table", "fp8_figure", "grid_markdown", "grid_table", "group_runs",
           "load_results", "loss_scale_figure", "lost_updates_figure", "main", "make_report",
           "time_to_accuracy_figure"]

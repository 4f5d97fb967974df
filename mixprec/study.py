"""``python -m mixprec.study``: run models x modes x seeds (x an lr/momentum/weight-decay grid), one
``mixprec.run`` process per combination, then write the report.

    python -m mixprec.study --models resnet18 resnet34 --modes baseline amp --seeds 0 1 2 --epochs 50 --out results/t4

Every option of ``python -m mixprec.run`` other than those the study varies (``--mode``, ``--model``,
``--seed``, ``--lr``, ``--momentum``, ``--weight-decay``) is passed on to every run. Each combination runs
in a process of its own, so its peak memory is its own. A combination whose run directory under
``OUT/runs/`` has the same configuration and completed is skipped, and one that was interrupted is resumed
from its checkpoint (a run killed outright, with no summary, from its last epoch's), so running the same
command again continues an interrupted study. A combination that
fails is recorded and the study goes on. ``OUT/study.json`` lists every combination and what became of it,
and each run's console output is kept in ``OUT/study-logs/``. At the end it writes the report to
``OUT/report/`` and prints one line per group: model, mode, seeds, mean test accuracy and its difference
from the baseline (``python -m mixprec.report OUT`` prints the full tables). Exit code: 0 when every combination
completed, 1 when any failed, 2 on bad input, 130/143 when interrupted.
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from .cli import OneLineParser, UsageError, handling_signals
from .config import (
    MODES,
    RESUME_MAY_CHANGE,
    RunConfig,
    changed,
    config_from_json,
    defaults,
    option_name,
    options_with,
    parse_command,
)

PROG = "python -m mixprec.study"
VARIED = (*map(option_name, options_with("study")), "--resume")  # what the study sets per combination
GRID = options_with("grid")  # lr, momentum, weight_decay: several values each


def ablation_label(cfg: RunConfig) -> str:
    """``""``, or ``" loss_scale=none master_weights=none"``: the run's non-default ablation options, so that
    two variants of one model, mode and seed (an ablation study) get their own label and study-logs/ file."""
    values = [(k, getattr(cfg, k)) for k in changed(cfg, "ablation")]
    return "".join(f" {k}={','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in values)


@dataclass
class Combination:
    argv: list[str]  # the mixprec.run command line
    label: str
    status: str = "pending"  # completed, skipped (completed before), failed, interrupted
    run_dir: str | None = None
    exit_code: int | None = None
    seconds: float | None = None
    test_accuracy: float | None = None
    error: str | None = None


def build_parser() -> argparse.ArgumentParser:
    from .models import MODELS

    p = OneLineParser(prog=PROG, allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Run every combination of models x modes x seeds (x the lr, momentum and "
                       "weight-decay values) with python -m mixprec.run, each in its own process, skipping "
                       "combinations already completed, then write the report (python -m mixprec.report).",
                       epilog="Any other option of python -m mixprec.run (--epochs, --subset, --data, --device, "
                       "--amp-dtype, ...) is passed on to every run; see python -m mixprec.run --help.")
    p.add_argument("--models", nargs="+", default=["resnet18"], choices=tuple(MODELS), metavar="MODEL",
                   help=f"models to train: {', '.join(MODELS)}")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, metavar="MODE",
                   help="precision modes: baseline, amp, manual")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], metavar="SEED", help="seeds, one run each")
    for name in GRID:
        p.add_argument(option_name(name), nargs="+", type=float, default=[defaults()[name]], metavar=name.upper(),
                       help=f"{name.replace('_', ' ')} values (a grid)")
    p.add_argument("--out", default="results", help="results directory: runs go to OUT/runs/, the report to "
                   "OUT/report/")
    p.add_argument("--no-report", dest="report", action="store_false",
                   help="do not write the report at the end")
    return p


def plan(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[Combination]]:
    """The study's options and its combinations, each a validated ``mixprec.run`` command line.
    Seeds vary slowest, so that an interrupted study has whole seeds done."""
    args, passed_on = build_parser().parse_known_args(argv)
    for token in passed_on:
        if token.split("=")[0] in VARIED:
            raise UsageError(f"{token.split('=')[0]} is set per combination by the study; use --models, --modes, "
                             f"--seeds or {', '.join(map(option_name, GRID))} (several values each)")
    lists = {"seeds": args.seeds, "models": args.models, **{name: getattr(args, name) for name in GRID},
             "modes": args.modes}
    for option, values in lists.items():
        if len(set(values)) != len(values):
            raise UsageError(f"--{option.replace('_', '-')} lists a value twice: {' '.join(map(str, values))}")
    combos = []
    for seed, model, *values, mode in itertools.product(*lists.values()):
        grid = dict(zip(GRID, values))
        argv_run = ["--mode", mode, "--model", model, "--seed", str(seed),
                    *(token for name, value in grid.items() for token in (option_name(name), repr(value))),
                    *passed_on, "--out", args.out]
        cfg, _ = parse_command(argv_run)  # validates every combination before the first one runs (argparse exits 2)
        label = "" if all(len(lists[name]) == 1 for name in GRID) else \
            "".join(f" {name}={value:g}" for name, value in grid.items())
        combos.append(Combination(argv_run, f"{model} {mode} seed {seed}{ablation_label(cfg)}{label}"))
    from .device import resolve_device

    resolve_device(cfg.device)  # the same in every combination: --device cuda without a GPU is said now, once
    return args, combos


def find_run(out: str, argv_run: list[str]) -> tuple[Path, str] | None:
    """The newest run directory under ``out/runs`` with this command line's configuration (the options that
    ``--resume`` may change, such as ``--data`` and ``--log-every``, aside), and its status: ``completed``,
    ``interrupted``, ``failed`` or ``unknown`` (no summary yet)."""
    from .results import read_json

    aside = dict.fromkeys(RESUME_MAY_CHANGE)  # reset to None on both sides: they do not change what a run trains
    cfg, _ = parse_command(argv_run)
    cfg = replace(cfg, **aside)
    found = []
    for config_file in (Path(out) / "runs").glob("*/config.json"):
        try:
            if replace(config_from_json(read_json(config_file)), **aside) != cfg:
                continue
        except (OSError, ValueError, TypeError, UsageError):
            continue  # not a run of ours, or a corrupt one: the report warns about those
        try:
            status = read_json(config_file.parent / "summary.json").get("status", "unknown")
        except (OSError, ValueError, AttributeError):
            status = "unknown"
        found.append((config_file.stat().st_mtime, config_file.parent, status))
    if not found:
        return None
    _, run_dir, status = max(found)
    return run_dir, status


def resumable(run_dir: Path, status: str) -> bool:
    """Whether a run found by :func:`find_run` can go on from its checkpoint: interrupted (it checkpointed on the
    signal), or killed outright (SIGKILL, a lost machine: no summary) after its first checkpoint. Such a
    run's CSVs are rewritten whole from the checkpoint, so the steps after it are simply run again."""
    return status == "interrupted" or (status == "unknown" and (run_dir / "checkpoint.pt").exists())


class Stop:
    """SIGINT/SIGTERM handler: passes the signal on, once, to the run in progress (which checkpoints and
    exits 130/143); the study then stops. Runs start in their own session, so a Ctrl-C in the terminal
    reaches them only through here, and only once."""

    def __init__(self):
        self.signum: int | None = None
        self.child: subprocess.Popen | None = None

    def __call__(self, signum, frame):
        if self.signum is None and self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)
        self.signum = signum


def run_one(combo: Combination, out: str, log_dir: Path, stop: Stop, existing: tuple[Path, str] | None) -> int:
    """Run one combination in a child process, or resume ``existing`` (its run directory and status, from
    :func:`find_run`) when that was interrupted, or killed (no summary) after its first checkpoint; its console
    output goes to ``log_dir``."""
    argv = combo.argv
    if existing is not None and resumable(*existing):
        data = combo.argv[combo.argv.index("--data"):][:2] if "--data" in combo.argv else []
        argv = ["--resume", str(existing[0]), *data]
    log = log_dir / (combo.label.replace(" ", "_").replace("=", "") + ".log")
    start = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"$ python -m mixprec.run {' '.join(argv)}\n")
        f.flush()
        stop.child = subprocess.Popen([sys.executable, "-m", "mixprec.run", *argv], stdout=f,
                                      stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                      start_new_session=True)
        code = stop.child.wait()
    combo.seconds = time.perf_counter() - start
    combo.exit_code = code
    found = find_run(out, combo.argv)
    combo.run_dir = str(found[0]) if found else None
    if code == 0:
        combo.status = "completed"
        combo.test_accuracy = _summary(found[0]).get("test_accuracy") if found else None
    else:
        combo.status = "interrupted" if code in (130, 143) else "failed"
        combo.error = (_summary(found[0]).get("error") if found else None) or _last_line(log)
    return code


def _summary(run_dir: Path) -> dict:
    from .results import read_json

    try:
        return read_json(run_dir / "summary.json")
    except (OSError, ValueError):
        return {}


def _last_line(path: Path) -> str:
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else f"no output (see {path})"


def _run_all(combos: list[Combination], out: str, log_dir: Path, stop: Stop, record) -> int:
    """Every combination in turn, with an overall progress bar; 0, 1 (some failed) or 128 + signal."""
    from tqdm.auto import tqdm

    print(f"[mixprec.study] {len(combos)} combinations; results in {out}", file=sys.stderr)
    code = 0
    with tqdm(combos, desc="study", unit="run", file=sys.stderr, dynamic_ncols=True) as bar:
        for i, combo in enumerate(bar, 1):
            if stop.signum is not None:
                break
            done = find_run(out, combo.argv)
            if done is not None and done[1] == "completed":
                combo.status, combo.run_dir = "skipped", str(done[0])
                tqdm.write(f"[{i}/{len(combos)}] {combo.label}: completed before ({done[0].name}), skipped",
                           file=sys.stderr)
                continue
            bar.set_postfix_str(combo.label)
            exit_code = run_one(combo, out, log_dir, stop, done)
            record()
            outcome = (f"test accuracy {combo.test_accuracy:.4f}" if combo.status == "completed"
                       else f"{combo.status} (exit {exit_code}): {combo.error}")
            tqdm.write(f"[{i}/{len(combos)}] {combo.label}: {outcome}, {combo.seconds:.0f} s", file=sys.stderr)
            if combo.status == "failed":
                code = 1
    if stop.signum is not None:
        tqdm.write(f"{PROG}: interrupted; run the same command again to continue", file=sys.stderr)
        return 128 + stop.signum
    return code


def main(argv: list[str] | None = None) -> int:
    try:
        args, combos = plan(argv)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    from .results import write_json

    out = Path(args.out)
    log_dir = out / "study-logs"
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"{PROG}: error: cannot create {log_dir} ({e.strerror}); pass --out with a writable directory",
              file=sys.stderr)
        return 2

    def record():
        write_json(out / "study.json", {"argv": sys.argv[1:] if argv is None else argv,
                                        "combinations": [vars(c) for c in combos]})

    stop = Stop()
    try:
        with handling_signals(stop):
            code = _run_all(combos, args.out, log_dir, stop, record)
    finally:
        record()
    if code in (130, 143):
        return code
    failed = [c for c in combos if c.status == "failed"]
    print(f"[mixprec.study] {len(combos) - len(failed)} of {len(combos)} combinations completed"
          + (f"; failed: {', '.join(c.label for c in failed)} (logs in {log_dir})" if failed else ""), file=sys.stderr)
    if args.report:
        code = code or _report(out)
    return code


def _report(out: Path) -> int:
    """Write the report under ``out/report`` and print one line per group (not the whole report, which is
    wider than a terminal); 0, or 2 with the report's one-line error."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    from .report import make_report
    from .report.build import PROG as REPORT_PROG

    try:
        print(make_report(out, short=True))
    except UsageError as e:
        print(f"{REPORT_PROG}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

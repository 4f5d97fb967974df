"""The GPU study as one command, within a time budget: tests, speed and memory, then training runs.

    bash experiments/gpu_study.sh OUT --data PATH [--budget-s 480] [--results DIR] [--rehearse]

Runs from the source tree with the interpreter that started it (``${PYTHON:-python3}`` in the shell
wrapper) and installs nothing. Work goes into ``--results`` (default ``results/gpu-study``; with
``--rehearse``, ``OUT/rehearsal``), most valuable first:

1. ``pytest -m cuda`` and ``experiments/half_agreement.py`` (native FP16 kernels against the emulation);
2. speed and memory (``experiments/bench_gpu.py``): ResNet-18/34/50 and EfficientNet-B0 at batch 128 in
   true FP32 (``--no-tf32``), TF32, amp and manual, the variants interleaved in one process per model;
3. ResNet-18 on all 45,000 training images in baseline (``--no-tf32``), amp and manual, seed 0, with
   :data:`RECIPE` (``--no-tf32`` in every mode, so that the report compares them as one setting);
4. then, in order: the ``torch.compile`` rows of ResNet-18; seeds 1 and 2 of stage 3; EfficientNet-B0;
   ResNet-34 and ResNet-50 for accuracy.

**The budget rule.** A stage starts only if the time since the start, plus its estimate, plus
:attr:`Sizes.reserve` (the report and the archive) is within ``--budget-s``; a stage that does not fit is
skipped with the reason logged, and later, cheaper stages may still start. A training run's estimate is
its epochs times its images times the per-image step time that stage 2 measured for its model and mode
(plus evaluation and start-up), scaled by how far the study's earlier runs overran their estimates (or
came in under them, down to 0.75). Each
stage is also stopped (SIGTERM, then SIGKILL) when it reaches the budget less the reserve, so an estimate
that is wrong costs that stage, never the archive.

**Always an archive.** However the stages end, the study writes ``OUT/gpu-study.tar.gz``: the results
directory without checkpoints (``*.pt``) — run directories, benchmark tables (``bench/``), the report
(``report/``, by ``python -m mixprec.report``), ``gpu-study.json`` (every stage's status, estimate and
time) and the logs (``logs/<UTC time>/``, one per stage and ``gpu-study.log``, with each stage's start-up
time). Unpacked into the results directory (``tar -xzf OUT/gpu-study.tar.gz -C results/gpu-study``), it
is what a second attempt skips: completed runs, benchmarked models and passed stages are not run again.

``--rehearse`` runs the same pipeline on the CPU at tiny sizes (:data:`REHEARSAL`) with a small budget,
to check everything but the GPU before a lease. Exit code 0 when every stage that started completed,
1 when one failed, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

T0 = time.monotonic()
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROG = "gpu_study.sh"
ARCHIVE = "gpu-study.tar.gz"
ARCHIVE_LIMIT = 16 * 2**20  # the most one file may weigh to come back from the GPU machine
BENCH_MODELS = ("resnet18", "resnet34", "resnet50", "efficientnet_b0")
MODES = ("baseline", "amp", "manual")
# Stage 3's recipe, aimed at ResNet-18 >= 93% FP32 (not yet verified: it has never run on a GPU): 18 epochs, one of
# linear warm-up from lr/10, then cosine to 0; SGD with Nesterov momentum, label smoothing, crops from a 4-pixel
# padding, and test-time flips.
RECIPE = {"--epochs": "18", "--batch-size": "128", "--lr": "0.1", "--momentum": "0.9", "--weight-decay": "5e-4",
          "--schedule": "cosine", "--warmup-epochs": "1", "--label-smoothing": "0.1", "--crop-padding": "4"}
RECIPE_FLAGS = ("--nesterov", "--test-time-flip", "--no-tf32")
EFFICIENTNET_LR = "0.05"  # inside Frankola 2022's grid (0.03-0.1); CPU probes of 0.03-0.1 learned alike (effnet-probes)


@dataclass(frozen=True)
class Sizes:
    """What one study runs at, and its cost estimates in seconds (a GPU's, or a CPU rehearsal's)."""

    device: str
    budget_s: float
    reserve: float  # the report and the archive, after the last stage
    bench_batch: int
    bench_warmup: int
    bench_steps: int  # per timed round
    bench_rounds: int
    bench_seconds: float  # timing stops after the round that passes this
    estimates: dict = field(default_factory=dict)  # stage kind -> seconds, for the stages not estimated from data
    run_overhead: float = 30.0  # a training process's start-up, model build, autotuning, writing
    train_images: int = 45_000
    val_images: int = 5_000
    test_images: int = 10_000
    overrides: dict = field(default_factory=dict)  # RECIPE options replaced (a rehearsal's tiny runs)


GPU = Sizes(device="cuda", budget_s=480, reserve=45, bench_batch=128, bench_warmup=3, bench_steps=10,
            bench_rounds=5, bench_seconds=6,
            estimates={"data": 60, "cuda-tests": 90, "half-agreement": 30, "bench": 45, "compile": 300},
            run_overhead=30)
# tiny sizes for a CPU: the bench and the runs at one batch size, so that runs are estimated from the bench's
# step time as on the GPU; 8 steps an epoch
REHEARSAL = Sizes(device="cpu", budget_s=240, reserve=40, bench_batch=8, bench_warmup=1, bench_steps=1,
                  bench_rounds=1, bench_seconds=1,
                  estimates={"data": 40, "cuda-tests": 40, "half-agreement": 20, "bench": 25, "compile": 600},
                  run_overhead=20, train_images=64, val_images=100, test_images=100,
                  overrides={"--epochs": "1", "--warmup-epochs": "0.25", "--batch-size": "8", "--subset": "64",
                             "--test-subset": "100"})


@dataclass
class Stage:
    """One piece of work: a command run from the source tree, with its log and how it is estimated."""

    name: str
    kind: str  # data, cuda-tests, half-agreement, bench, compile, train
    argv: list[str]  # after the interpreter
    output: Path | None = None  # where its stdout goes (else into its log)
    model: str | None = None
    mode: str | None = None
    needs: str | None = None  # a stage whose failure makes this one pointless


def fits(elapsed: float, estimate: float | None, reserve: float, budget: float) -> bool:
    """The budget rule: start only what is estimated to end, with the reserve for the report and the archive
    still left, by the budget. Without an estimate, nothing starts."""
    return estimate is not None and math.isfinite(estimate) and elapsed + estimate + reserve <= budget


def train_estimate(step_s: float | None, batch: int, sizes: Sizes, epochs: int, flip: bool,
                   overrun: float = 1.0) -> float | None:
    """Seconds for one training run, from a step time measured at ``batch`` images: every epoch's training
    images (plus 15% for the loop's own work) and its validation pass (a forward pass costs about a third of a
    training step per image, twice with test-time flips), the test pass, and the process's start-up; times the
    ``overrun`` of earlier runs (measured / estimated). None when the step time was not measured."""
    if step_s is None or not math.isfinite(step_s) or step_s <= 0:
        return None
    per_image = step_s / batch
    evaluation = (2 if flip else 1) * per_image / 3
    seconds = epochs * (1.15 * sizes.train_images * per_image + sizes.val_images * evaluation)
    return overrun * (seconds + sizes.test_images * evaluation + sizes.run_overhead)


def recipe_argv(model: str, sizes: Sizes) -> list[str]:
    options = {**RECIPE, **({"--lr": EFFICIENTNET_LR} if model.startswith("efficientnet") else {}), **sizes.overrides}
    return [token for kv in options.items() for token in kv] + list(RECIPE_FLAGS)


def run_argv(model: str, mode: str, seed: int, sizes: Sizes, data: str, results: Path) -> list[str]:
    """The ``mixprec.run`` command line of one training run of the study."""
    return ["-m", "mixprec.run", "--mode", mode, "--model", model, "--seed", str(seed), *recipe_argv(model, sizes),
            "--device", sizes.device, "--data", data, "--out", str(results)]


def plan(sizes: Sizes, data: str, results: Path) -> list[Stage]:
    """Every stage, most valuable first."""
    bench = results / "bench"
    py_bench = ["experiments/bench_gpu.py", "--device", sizes.device, "--batch-size", str(sizes.bench_batch),
                "--warmup", str(sizes.bench_warmup), "--steps-per-round", str(sizes.bench_steps),
                "--max-rounds", str(sizes.bench_rounds), "--max-seconds", str(sizes.bench_seconds)]
    stages = [
        Stage("data", "data", ["-c", "import sys; from mixprec.data import load_cifar10; a = load_cifar10(sys.argv[1]);"
                               " print(f'CIFAR-10 decoded and cached: {len(a.train_labels)} train, '"
                               "f'{len(a.test_labels)} test images')", data]),
        Stage("cuda-tests", "cuda-tests", ["-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests"],
              output=results / "tests" / "cuda-tests.txt"),
        Stage("half-agreement", "half-agreement", ["experiments/half_agreement.py", "--device", sizes.device],
              output=bench / "half_agreement.md"),
    ]
    stages += [Stage(f"bench {m}", "bench", [*py_bench, "--model", m, "--out", str(bench / f"{m}.csv")], model=m)
               for m in BENCH_MODELS]

    def runs(model: str, seed: int) -> list[Stage]:
        return [Stage(f"train {model} {mode} seed {seed}", "train", run_argv(model, mode, seed, sizes, data, results),
                      model=model, mode=mode, needs="data") for mode in MODES]

    stages += runs("resnet18", 0)
    stages.append(Stage("compile resnet18", "compile",
                        [*py_bench, "--model", "resnet18", "--compile", "--out", str(bench / "resnet18-compile.csv")],
                        model="resnet18"))
    stages += runs("resnet18", 1) + runs("resnet18", 2)
    for model in ("efficientnet_b0", "resnet34", "resnet50"):
        stages += runs(model, 0)
    return stages


MIN_OVERRUN = 0.75
BENCH_VARIANT = {"baseline": "fp32", "amp": "amp", "manual": "manual"}  # the bench row a run's time scales from


def measured_step(results: Path, model: str, mode: str) -> tuple[float | None, int]:
    """Stage 2's median step time of ``model`` in the variant that ``mode``'s run trains as, and its batch."""
    import pandas as pd

    path = results / "bench" / f"{model}.csv"
    try:
        rows = pd.read_csv(path)
        row = rows[(rows["variant"] == BENCH_VARIANT[mode]) & rows["error"].isna()].iloc[0]
        return float(row["median_step_s"]), int(row["batch_size"])
    except (OSError, KeyError, IndexError, ValueError, pd.errors.EmptyDataError):
        return None, 0


class Study:
    """Runs the stages in order under the budget rule, records them in ``gpu-study.json``, and archives."""

    def __init__(self, sizes: Sizes, data: str, results: Path, out: Path, python: str, start: float = T0):
        self.sizes, self.data, self.results, self.out, self.python = sizes, data, results, out, python
        self.start = start  # the budget counts from here: the process's start
        self.stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        self.logs = results / "logs" / self.stamp
        self.logs.mkdir(parents=True, exist_ok=True)
        self.state_file = results / "gpu-study.json"
        self.state = self._read_state()
        self.overruns: list[float] = []  # measured / estimated, per training run of this attempt
        self.failed = False

    def _read_state(self) -> dict:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {"attempts": [], "stages": {}}

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def log(self, msg: str) -> None:
        line = f"[{self.elapsed():6.1f} s] {msg}"
        print(f"[gpu-study] {line}", flush=True)
        with open(self.logs / "gpu-study.log", "a") as f:
            f.write(line + "\n")

    def record(self, stage: Stage, **values) -> None:
        from mixprec.results import write_json

        self.state["stages"][stage.name] = {**self.state["stages"].get(stage.name, {}), **values,
                                            "attempt": self.stamp}
        write_json(self.state_file, self.state)

    # --- what is done already, and what a stage will cost

    def done_before(self, stage: Stage) -> str | None:
        """Why ``stage`` need not run (its result is in the results directory), or None."""
        if stage.kind == "train":
            from mixprec.study import find_run

            found = find_run(str(self.results), stage.argv[2:])
            return f"completed before ({found[0].name})" if found and found[1] == "completed" else None
        previous = self.state["stages"].get(stage.name, {})
        if previous.get("status") == "completed" and (stage.output is None or stage.output.exists()):
            if stage.kind not in ("bench", "compile") or Path(stage.argv[-1]).exists():
                return f"completed before (attempt {previous.get('attempt')})"
        return None

    def estimate(self, stage: Stage) -> float | None:
        if stage.kind != "train":
            return self.sizes.estimates[stage.kind]
        step_s, batch = measured_step(self.results, stage.model, stage.mode)
        epochs = int(stage.argv[stage.argv.index("--epochs") + 1])
        # earlier runs' measured / estimated, the largest; a run that came in faster lowers the next estimates,
        # but never below MIN_OVERRUN of them (another mode can be slower than its bench step suggests)
        overrun = max(max(self.overruns, default=1.0), MIN_OVERRUN)
        return train_estimate(step_s, batch, self.sizes, epochs, "--test-time-flip" in stage.argv, overrun)

    # --- running

    def run(self, stages: list[Stage]) -> None:
        self.state["attempts"].append({"started": self.stamp, "budget_s": self.sizes.budget_s,
                                       "device": self.sizes.device})
        statuses: dict[str, str] = {}
        for stage in stages:
            try:
                statuses[stage.name] = self._consider(stage, statuses)
            except Exception as e:  # noqa: BLE001 - a fault of the study's own code costs one stage, not the rest
                self.log(f"{stage.name}: the study itself failed on it: {type(e).__name__}: {e}")
                statuses[stage.name], self.failed = "failed", True

    def _consider(self, stage: Stage, statuses: dict[str, str]) -> str:
        """Run ``stage``, or say why not; its status for the stages that need it."""
        if stage.needs and statuses.get(stage.needs) == "failed":
            self.log(f"{stage.name}: not started, {stage.needs} failed")
            return "not started"
        why = self.done_before(stage)
        if why:
            self.log(f"{stage.name}: {why}, skipped")
            return "completed"
        estimate = self.estimate(stage)
        if not fits(self.elapsed(), estimate, self.sizes.reserve, self.sizes.budget_s):
            reason = ("no step time measured for it in stage 2" if estimate is None else
                      f"estimated {estimate:.0f} s would end at {self.elapsed() + estimate:.0f} s, past the "
                      f"budget {self.sizes.budget_s:.0f} s less {self.sizes.reserve:.0f} s for the report and "
                      "archive")
            self.log(f"{stage.name}: skipped, {reason}")
            self.record(stage, status="skipped (budget)", reason=reason, estimate_s=estimate)
            return "skipped"
        return self.run_stage(stage, estimate)

    def run_stage(self, stage: Stage, estimate: float) -> str:
        slug = stage.name.replace(" ", "-")
        log_path = self.logs / f"{slug}.log"
        limit = self.sizes.budget_s - self.sizes.reserve - self.elapsed()
        self.log(f"{stage.name}: starting (estimate {estimate:.0f} s, stopped after {limit:.0f} s at most); "
                 f"log {log_path.relative_to(self.results)}")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(
            os.pathsep), "PYTHONUNBUFFERED": "1"}
        if stage.output is not None:
            stage.output.parent.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        with open(log_path, "w") as log_file:
            log_file.write(f"$ {self.python} {' '.join(stage.argv)}\n")
            log_file.flush()
            stdout = open(stage.output.with_suffix(stage.output.suffix + ".tmp"), "w") if stage.output else log_file
            proc = subprocess.Popen([self.python, *stage.argv], cwd=ROOT, env=env, stdout=stdout, stderr=log_file,
                                    start_new_session=True)
            code, stopped = self._wait(proc, limit)
            if stage.output:
                stdout.close()
            seconds = time.monotonic() - start
            log_file.write(f"\n[gpu-study] exit {code} after {seconds:.1f} s (estimate {estimate:.0f} s)\n")
        if stage.output:
            os.replace(stage.output.with_suffix(stage.output.suffix + ".tmp"), stage.output)
        status = "completed" if code == 0 else ("stopped at the budget" if stopped else "failed")
        details = {}
        if stage.kind == "train":
            details = self._run_details(stage, seconds, estimate)
            status = details.pop("status", status) if code == 0 or stopped else status
        self.log(f"{stage.name}: {status} (exit {code}) in {seconds:.1f} s, estimate {estimate:.0f} s"
                 + "".join(f"; {k} {v}" for k, v in details.items()))
        self.record(stage, status=status, exit_code=code, seconds=round(seconds, 1), estimate_s=round(estimate, 1),
                    log=str(log_path.relative_to(self.results)), **details)
        if status == "failed":
            self.failed = True
            tail = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()][-3:]
            self.log(f"{stage.name}: last lines of its log: " + " | ".join(tail))
        return "failed" if status == "failed" else "completed" if status == "completed" else "stopped"

    def _wait(self, proc: subprocess.Popen, limit: float) -> tuple[int, bool]:
        """The exit code, and whether the budget stopped it (SIGTERM: a training run checkpoints and writes its
        summary as interrupted; SIGKILL 30 s later)."""
        try:
            return proc.wait(timeout=max(limit, 1)), False
        except KeyboardInterrupt:  # the study was interrupted: so is its stage, which runs in a session of its own
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
            raise
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                return proc.wait(timeout=30), True
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                return proc.wait(), True

    def _run_details(self, stage: Stage, seconds: float, estimate: float) -> dict:
        """A training run's outcome from its summary, and how its time splits (for planning the next budget)."""
        from mixprec.study import find_run
        from mixprec.results import read_json

        found = find_run(str(self.results), stage.argv[2:])
        if found is None:
            return {}
        try:
            summary = read_json(found[0] / "summary.json")
        except (OSError, ValueError):
            return {"run_dir": found[0].name}
        train_s = summary.get("train_time_s") or 0.0
        if summary.get("status") == "completed":
            self.overruns.append(seconds / estimate)
        return {"status": summary.get("status"), "run_dir": found[0].name,
                "test_accuracy": summary.get("test_accuracy"), "train_time_s": round(train_s, 1),
                "outside_training_s": round(seconds - train_s, 1)}  # start-up, evaluation and writing

    # --- the end: report and archive, whatever happened

    def finish(self) -> Path:
        try:
            self.report()
        except Exception as e:  # noqa: BLE001 - the archive is written whatever the report does
            self.log(f"report: the study's tables failed: {type(e).__name__}: {e}")
            self.failed = True
        self.log(f"done: {self.summary_line()}")
        return self.archive()

    def summary_line(self) -> str:
        counts: dict[str, int] = {}
        for value in self.state["stages"].values():
            if value.get("attempt") == self.stamp:
                counts[value["status"]] = counts.get(value["status"], 0) + 1
        return ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "nothing ran"

    def report(self) -> None:
        bench_tables(self.results)
        if any((self.results / "runs").glob("*/summary.json")):
            try:  # within the reserve, leaving time for the archive
                code = subprocess.run([self.python, "-m", "mixprec.report", str(self.results)], cwd=ROOT,
                                      env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                                      timeout=max(self.sizes.reserve - 15, 10))
            except subprocess.TimeoutExpired:
                self.log("report: stopped, it outran the reserve; python -m mixprec.report regenerates it")
                return
            with open(self.logs / "report.log", "w") as f:
                f.write(code.stdout + code.stderr)
            self.log(f"report: exit {code.returncode}" + ("" if code.returncode == 0 else
                                                         f" ({(code.stderr.strip().splitlines() or [''])[-1]})"))

    def archive(self) -> Path:
        """``OUT/gpu-study.tar.gz``: the results directory without checkpoints, written under a temporary name
        and renamed into place; steps.csv files are left out only if the archive would pass 16 MiB."""
        self.out.mkdir(parents=True, exist_ok=True)
        target = self.out / ARCHIVE
        for drop_steps in (False, True):
            tmp = target.with_name(f".{ARCHIVE}.tmp")
            with tarfile.open(tmp, "w:gz") as tar:
                for path in sorted(self.results.rglob("*")):
                    if path.is_file() and path.suffix != ".pt" and not path.name.endswith(".tmp") and not (
                            drop_steps and path.name == "steps.csv"):
                        tar.add(path, arcname=str(path.relative_to(self.results)))
            size = tmp.stat().st_size
            if size <= ARCHIVE_LIMIT or drop_steps:
                break
            self.log(f"archive: {size / 2**20:.1f} MiB is over 16 MiB; packing it again without steps.csv")
        os.replace(tmp, target)
        print(f"[gpu-study] wrote {target} ({size / 2**20:.2f} MiB{', OVER 16 MiB' if size > ARCHIVE_LIMIT else ''}) "
              f"after {self.elapsed():.0f} s", flush=True)
        return target


def bench_tables(results: Path) -> None:
    """``bench/speed_memory.md`` and ``.csv``: the report's training-step table (every benchmarked model and
    variant, its ratios, the targets), beside the benchmark's CSVs, so that an archive has it even when no run
    completed; ``python -m mixprec.report`` writes the same table into ``report/``."""
    from mixprec.report.runs import STEP_BENCH_TABLE
    from mixprec.report.tables import step_bench_markdown, step_bench_table
    from mixprec.results import write_csv, write_text

    frame = step_bench_table(results)
    if frame is not None:
        write_csv(results / "bench" / f"{STEP_BENCH_TABLE}.csv", frame)
        write_text(results / "bench" / f"{STEP_BENCH_TABLE}.md",
                   f"# Training step: speed and memory\n\n{step_bench_markdown(frame)}\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="where gpu-study.tar.gz goes")
    p.add_argument("--data", required=True, help="CIFAR-10 as mixprec.run --data takes it (e.g. a copy of "
                   "cifar10-jpeg.tar.gz inside the checkout)")
    p.add_argument("--budget-s", type=float, default=None,
                   help=f"start no stage that would end after this many seconds (default {GPU.budget_s:g}; "
                   f"{REHEARSAL.budget_s:g} with --rehearse)")
    p.add_argument("--results", type=Path, default=None,
                   help="the study's directory (default results/gpu-study; OUT/rehearsal with --rehearse)")
    p.add_argument("--rehearse", action="store_true", help="the same pipeline on the CPU at tiny sizes")
    args = p.parse_args(argv)
    sizes = REHEARSAL if args.rehearse else GPU
    if args.budget_s is not None:
        if not args.budget_s > 0:
            p.error(f"--budget-s must be a positive number of seconds, got {args.budget_s:g}")
        sizes = replace(sizes, budget_s=args.budget_s)
    data = Path(args.data).resolve()
    if not data.exists():
        p.error(f"--data {args.data} does not exist: copy CIFAR-10 into the checkout (docs/gpu.md) and pass its path")
    import torch

    if not args.rehearse and not torch.cuda.is_available():
        p.error(f"no CUDA GPU is visible (torch {torch.__version__}): run it on a GPU machine, or add --rehearse")
    out = args.out.resolve()
    results = (args.results or (out / "rehearsal" if args.rehearse else ROOT / "results" / "gpu-study")).resolve()
    study = Study(sizes, str(data), results, out, sys.executable)
    study.log(f"{'rehearsal on the CPU' if args.rehearse else 'GPU study'}: budget {sizes.budget_s:g} s, results in "
              f"{results}, torch {torch.__version__}"
              + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "")
              + f"; python start-up and imports {study.elapsed():.1f} s")
    try:
        study.run(plan(sizes, str(data), results))
    except KeyboardInterrupt:
        study.log("interrupted: archiving what completed")
        study.failed = True
    finally:
        study.finish()
    return 1 if study.failed else 0


if __name__ == "__main__":
    sys.exit(main())

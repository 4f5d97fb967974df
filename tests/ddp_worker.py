"""Run by tests/test_distributed.py, under ``torchrun --nproc_per_node 2`` (one process per rank) and as
one plain process, both with the same environment and ``OMP_NUM_THREADS=1``.

``python tests/ddp_worker.py DATA OUT`` under torchrun trains resnet20 on DATA for a few steps in every
mode, each rank saving its final weights and step log to OUT/<case>-rank<R>.pt; then one optimizer step
of each mode in ONE_STEP, saving the weights before and after it to OUT/<case>-one-step-rank<R>.pt; then
it runs ``mixprec.run`` itself.

``python tests/ddp_worker.py DATA OUT --one-process`` trains the same cases in one process, each global
batch in twice as many micro-batches (the ranks' micro-batches: the same shapes, so the same kernels),
saving OUT/<case>-one.pt and OUT/<case>-one-step-one.pt. Every file records the kernels it ran on
(:func:`kernels`), so the test can check that both sides really ran the same ones.
"""

import copy
import os
import sys
from pathlib import Path

import torch

from mixprec import distributed
from mixprec.config import RunConfig
from mixprec.data import load_cifar10, make_splits
from mixprec.run import main as run
from mixprec.train import train

CASES = {
    "baseline": {"mode": "baseline"},
    "amp": {"mode": "amp"},
    "manual": {"mode": "manual"},
    "manual-accumulate": {"mode": "manual", "accumulate": 2},
    "manual-overflow-on-rank-1": {"mode": "manual", "inject_overflow": (2,), "inject_overflow_rank": 1},
    "manual-stochastic": {"mode": "manual", "master_weights": "stochastic"},  # every rank draws the same bits
}
OPTIONS = {"model": "resnet20", "epochs": 1, "batch_size": 16, "subset": 96, "test_subset": 30, "device": "cpu"}
# trained on one batch too (one optimizer step), and compared against one process on both
ONE_STEP = ("baseline", "amp", "manual", "manual-accumulate")


def kernels() -> dict:
    """What picks this process's CPU kernels: ATen's instruction set, oneDNN's cap on it, and the thread count
    (oneDNN and ATen block their FP32 sums differently for other thread counts: other roundings)."""
    return {"torch": torch.__version__, "aten_capability": torch.backends.cpu.get_cpu_capability(),
            "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"), "threads": torch.get_num_threads()}


def trained(cfg: RunConfig, splits) -> tuple[list[dict], object]:
    """Train ``cfg``; return copies of the checkpoints handed to ``on_epoch`` (the first holds the initial
    weights; the checkpoints share the live tensors) and the run's result."""
    states = []
    result = train(cfg, splits, log=lambda msg: None,
                   on_epoch=lambda result, state, improved: states.append(copy.deepcopy(state)))
    return states, result


def one_process(data: str, out: str) -> None:
    """The cases of ONE_STEP, on OPTIONS and on one batch, trained by this one process, each global batch in
    twice as many micro-batches as a rank takes (the loss of each halved: a power of two, exact)."""
    out = Path(out)

    def doubled(options):
        return {**options, "accumulate": 2 * options.get("accumulate", 1)}

    splits = make_splits(load_cifar10(data), OPTIONS["subset"], OPTIONS["test_subset"])
    for case in ONE_STEP:
        _, result = trained(RunConfig(**doubled({**OPTIONS, **CASES[case]}), data=data), splits)
        torch.save({"steps": result.steps, "kernels": kernels()}, out / f"{case}-one.pt")

    one_batch = {**OPTIONS, "subset": OPTIONS["batch_size"]}
    one_batch_splits = make_splits(load_cifar10(data), one_batch["subset"], one_batch["test_subset"])
    for case in ONE_STEP:
        states, result = trained(RunConfig(**doubled({**one_batch, **CASES[case]}), data=data), one_batch_splits)
        torch.save({"before": states[0], "after": states[-1], "steps": result.steps, "kernels": kernels()},
                   out / f"{case}-one-step-one.pt")


def main(data: str, out: str) -> None:
    out = Path(out)
    distributed.init(torch.device("cpu"))
    rank = distributed.rank()

    flag = torch.tensor([float(rank == 1)])  # an overflow on rank 1 only
    distributed.any_overflow_(flag)
    torch.save(flag, out / f"found-inf-rank{rank}.pt")

    splits = make_splits(load_cifar10(data), OPTIONS["subset"], OPTIONS["test_subset"])
    for case, options in CASES.items():
        states, result = trained(RunConfig(**OPTIONS, **options, data=data), splits)
        torch.save({"model": states[-1]["model"], "master": states[-1]["master"], "steps": result.steps,
                    "test": result.test, "world_size": result.world_size, "kernels": kernels()},
                   out / f"{case}-rank{rank}.pt")

    one_batch = {**OPTIONS, "subset": OPTIONS["batch_size"]}
    one_batch_splits = make_splits(load_cifar10(data), one_batch["subset"], one_batch["test_subset"])
    for case in ONE_STEP:
        states, result = trained(RunConfig(**one_batch, **CASES[case], data=data), one_batch_splits)
        torch.save({"before": states[0], "after": states[-1], "steps": result.steps, "kernels": kernels()},
                   out / f"{case}-one-step-rank{rank}.pt")

    code = run(["--mode", "manual", "--model", "resnet20", "--epochs", "1", "--batch-size", "16", "--subset", "96",
                "--test-subset", "30", "--device", "cpu", "--data", data, "--out", str(out / "cli")])
    torch.save(code, out / f"cli-exit-rank{rank}.pt")


if __name__ == "__main__":
    if "--one-process" in sys.argv:
        one_process(*(a for a in sys.argv[1:] if a != "--one-process"))
    else:
        main(*sys.argv[1:])

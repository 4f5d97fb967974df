"""Run by tests/test_distributed.py under ``torchrun --nproc_per_node 2``: one process per rank.

``python tests/ddp_worker.py DATA OUT`` trains resnet20 on DATA for a few steps in every mode, each
rank saving its final weights and step log to OUT/<case>-rank<R>.pt; then one optimizer step of each
mode in ONE_STEP, saving the weights before and after it to OUT/<case>-one-step-rank<R>.pt; then it
runs ``mixprec.run`` itself.
"""

import copy
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
ONE_STEP = ("baseline", "amp", "manual", "manual-accumulate")  # trained on one batch: one optimizer step


def trained(cfg: RunConfig, splits) -> tuple[list[dict], object]:
    """Train ``cfg``; return copies of the checkpoints handed to ``on_epoch`` (the first holds the initial
    weights; the checkpoints share the live tensors) and the run's result."""
    states = []
    result = train(cfg, splits, log=lambda msg: None,
                   on_epoch=lambda result, state, improved: states.append(copy.deepcopy(state)))
    return states, result


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
                    "test": result.test, "world_size": result.world_size}, out / f"{case}-rank{rank}.pt")

    one_batch = {**OPTIONS, "subset": OPTIONS["batch_size"]}
    one_batch_splits = make_splits(load_cifar10(data), one_batch["subset"], one_batch["test_subset"])
    for case in ONE_STEP:
        states, result = trained(RunConfig(**one_batch, **CASES[case], data=data), one_batch_splits)
        torch.save({"before": states[0], "after": states[-1], "steps": result.steps},
                   out / f"{case}-one-step-rank{rank}.pt")

    code = run(["--mode", "manual", "--model", "resnet20", "--epochs", "1", "--batch-size", "16", "--subset", "96",
                "--test-subset", "30", "--device", "cpu", "--data", data, "--out", str(out / "cli")])
    torch.save(code, out / f"cli-exit-rank{rank}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])

"""Data-parallel training: two CPU processes under torchrun (gloo), against each other and against one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mixprec.config import RunConfig
from mixprec.data import load_cifar10, make_splits
from tests.ddp_worker import CASES, OPTIONS

WORKER = Path(__file__).with_name("ddp_worker.py")


@pytest.fixture(scope="module")
def two_ranks(tiny_cifar, tmp_path_factory):
    """Every case of tests/ddp_worker.py, trained by two ranks: ``{case: [rank 0's, rank 1's]}``."""
    out = tmp_path_factory.mktemp("ddp")
    data = str(tiny_cifar["pickles"])
    env_home = tmp_path_factory.mktemp("data_home")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER), data,
         str(out)], check=False, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[1],
        env={**_env(), "MIXPREC_DATA": str(env_home), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {case: [torch.load(out / f"{case}-rank{r}.pt", weights_only=False) for r in (0, 1)]
               for case in [*CASES, "found-inf", "cli-exit"]}
    return out, results, proc.stderr


def _env():
    return {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}


@pytest.mark.parametrize("case", list(CASES))
def test_ranks_end_with_identical_weights(two_ranks, case):
    _, results, _ = two_ranks
    rank0, rank1 = results[case]
    assert rank0["world_size"] == rank1["world_size"] == 2
    assert rank0["model"].keys() == rank1["model"].keys()
    for name in rank0["model"]:  # parameters and BatchNorm statistics alike
        assert torch.equal(rank0["model"][name], rank1["model"][name]), name
    if rank0["master"] is not None:
        assert all(torch.equal(a, b) for a, b in zip(rank0["master"], rank1["master"], strict=True))
    assert [s["loss"] for s in rank0["steps"]] == [s["loss"] for s in rank1["steps"]]
    assert rank0["test"] == rank1["test"]  # one gathered evaluation


def test_an_overflow_on_rank_1_only_skips_the_step_on_both_ranks(two_ranks):
    _, results, _ = two_ranks
    assert [r.item() for r in results["found-inf"]] == [1.0, 1.0]  # the flag itself is all-reduced
    rank0, rank1 = results["manual-overflow-on-rank-1"]
    for steps in (rank0["steps"], rank1["steps"]):
        assert [s["skipped"] for s in steps] == [False, True, False, False, False, False]
        assert [s["loss_scale"] for s in steps] == [2.0**16, 2.0**15, 2.0**15, 2.0**15, 2.0**15, 2.0**15]
    clean = results["manual"][0]["steps"]
    assert rank0["steps"][0]["loss"] == clean[0]["loss"]  # the same run until the injected step


@pytest.mark.parametrize("case, tolerance", [("baseline", 1e-5), ("manual", 2e-3), ("manual-accumulate", 2e-3)])
def test_two_processes_match_one_with_the_same_global_batch(two_ranks, tiny_cifar, case, tolerance):
    """One process with each global batch in two micro-batches is what two ranks compute: the same images and
    augmentation, BatchNorm statistics over the same halves, gradients averaged over the same halves."""
    _, results, _ = two_ranks
    options = {**OPTIONS, **CASES[case]}
    options["accumulate"] = 2 * options.get("accumulate", 1)
    data = str(tiny_cifar["pickles"])
    splits = make_splits(load_cifar10(data), OPTIONS["subset"], OPTIONS["test_subset"])
    from mixprec.train import train

    one = train(RunConfig(**options, data=data), splits, log=lambda msg: None)
    two = results[case][0]["steps"]
    assert len(one.steps) == len(two) == 6
    for a, b in zip(one.steps[:4], two[:4]):
        assert b["loss"] == pytest.approx(a["loss"], rel=tolerance), (a["step"], a["loss"], b["loss"])
        assert (a["skipped"], a["loss_scale"]) == (b["skipped"], b["loss_scale"])


def test_under_torchrun_only_rank_0_writes_the_run_and_records_the_world_size(two_ranks):
    out, results, stderr = two_ranks
    assert results["cli-exit"] == [0, 0]
    runs = list((out / "cli" / "runs").iterdir())
    assert len(runs) == 1
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["world_size"] == 2
    assert "x 2 processes (8 images each per step)" in (runs[0] / "train.log").read_text()
    assert stderr.count("run directory") == 1  # rank 1 does not log

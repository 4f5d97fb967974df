"""Data-parallel training: two CPU processes under torchrun (gloo), against each other and against one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.ddp_worker import CASES, ONE_STEP

WORKER = Path(__file__).with_name("ddp_worker.py")


def _env(data_home) -> dict:
    """The environment of both sides: this one (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA and all), without
    torchrun's variables, with one thread per process. One thread on both sides, rather than this process's
    torch.set_num_threads: a fresh process with OMP_NUM_THREADS=1 is what the ranks are, whatever this process
    (its thread pool, oneDNN's primitive cache, the flags other tests set) has been through."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "MIXPREC_DATA": str(data_home), "OMP_NUM_THREADS": "1"}


def _worker(tmp_path_factory, tiny_cifar, name: str, launcher: list[str], *extra: str):
    out = tmp_path_factory.mktemp(name)
    proc = subprocess.run([*launcher, str(WORKER), str(tiny_cifar["pickles"]), str(out), *extra], check=False,
                          capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[1],
                          env=_env(tmp_path_factory.mktemp("data_home")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stderr


@pytest.fixture(scope="module")
def two_ranks(tiny_cifar, tmp_path_factory):
    """Every case of tests/ddp_worker.py, trained by two ranks: ``{case: [rank 0's, rank 1's]}``."""
    out, stderr = _worker(tmp_path_factory, tiny_cifar, "ddp",
                          [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"])
    results = {case: [torch.load(out / f"{case}-rank{r}.pt", weights_only=False) for r in (0, 1)]
               for case in [*CASES, *(f"{c}-one-step" for c in ONE_STEP), "found-inf", "cli-exit"]}
    return out, results, stderr


@pytest.fixture(scope="module")
def one_process(tiny_cifar, tmp_path_factory):
    """The cases of ONE_STEP trained by one process, in the ranks' environment and thread count,
    each global batch in two micro-batches per rank's one: ``{case: result}``, ``{case}-one-step`` too."""
    out, _ = _worker(tmp_path_factory, tiny_cifar, "one", [sys.executable], "--one-process")
    return {case: torch.load(out / f"{case}-one.pt", weights_only=False)
            for case in [*ONE_STEP, *(f"{c}-one-step" for c in ONE_STEP)]}


@pytest.mark.parametrize("case", list(CASES))
def test_ranks_end_with_identical_weights(two_ranks, case):
    _, results, _ = two_ranks
    rank0, rank1 = results[case]
    assert rank0["world_size"] == rank1["world_size"] == 2
    assert rank0["model"].keys() == rank1["model"].keys()
    for name in rank0["model"]:  # parameters and BatchNorm statistics alike
        assert torch.equal(rank0["model"][name], rank1["model"][name]), name
    master0, master1 = rank0["master"], rank1["master"]
    if isinstance(master0, dict):  # --master-weights stochastic: the generator's state
        assert torch.equal(master0["generator"], master1["generator"])
    elif master0 is not None:
        assert all(torch.equal(a, b) for a, b in zip(master0, master1, strict=True))
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


def _same_kernels(*sides: dict) -> None:
    """Both sides ran the same CPU kernels: the same torch, instruction set and one thread each."""
    assert all(side["kernels"] == sides[0]["kernels"] for side in sides), [side["kernels"] for side in sides]
    assert sides[0]["kernels"]["threads"] == 1


U32 = 2.0**-24  # FP32's unit roundoff


def gamma(n: int) -> float:
    """Higham's bound on the relative error of n FP32 roundings in a row: |fl(x) - x| <= gamma(n) |x|."""
    return n * U32 / (1 - n * U32)


def _assert_same_first_loss(ranks: float, one: float, case: str) -> None:
    """A step's loss is the sum of its micro-batch losses, each divided by the count (a power of two here,
    exact), and the ranks' are averaged. Same kernels, same micro-batches: the same micro-batch losses on
    both sides; only the order of the FP32 additions can differ.

    - one micro-batch per rank (k = 1): one process adds l_a/2 + l_b/2, the ranks (l_a + l_b)/2: one rounding
      of the same sum, bit-identical;
    - k micro-batches per rank: one process adds its 2k losses in a row ((a+b)+c)+d (2k-1 roundings), the
      ranks add k each and then the two sums, (a+b)+(c+d) (k roundings on any term's path). Summed
      recursively, positive terms (cross-entropies) are off by at most gamma(roundings) times their sum
      S <= one / (1 - gamma(2k-1)) (Higham, Accuracy and Stability, 4.2): the two sides differ by at most
      (gamma(2k-1) + gamma(k)) S, about 5u for k = 2. Measured on one machine: 1 ulp, 1.6u. A wrong
      micro-batch or weight moves the loss by orders of magnitude more."""
    k = CASES[case].get("accumulate", 1)
    if k == 1:
        assert ranks == one
    else:
        bound = (gamma(2 * k - 1) + gamma(k)) * one / (1 - gamma(2 * k - 1))
        assert abs(ranks - one) <= bound, (ranks, one, abs(ranks - one) / (U32 * one))


def _update(states: list[dict]) -> torch.Tensor:
    """The first optimizer step's change of the trained (FP32) weights, as one vector."""
    def weights(state):
        if state["master"] is not None:
            return state["master"]
        return [v for k, v in state["model"].items() if not k.endswith(("running_mean", "running_var", "tracked"))]
    return torch.cat([(b.float() - a.float()).flatten() for a, b in zip(weights(states[0]), weights(states[-1]),
                                                                         strict=True)])


U16 = 2.0**-11  # FP16's unit roundoff


@pytest.mark.parametrize("case, bound", [("baseline", 0.0), ("amp", U16), ("manual", U16),
                                         ("manual-accumulate", 6 * U16)])
def test_two_processes_take_the_first_step_of_one_with_the_same_global_batch(two_ranks, one_process, case, bound):
    """Two ranks, each on half of the global batch, against one process taking each batch in two micro-batches
    (BatchNorm normalizes over the same halves either way), on one optimizer step, where the comparison is
    well conditioned. With the same kernels on both sides the arithmetic differs only in how the micro-batch
    gradients are added up:

    - baseline: one process adds g_a/2 + g_b/2 (the loss halved: a power of two, exact), DDP adds g_a/2 and
      g_b/2 in one all-reduce of two terms: the same sum, so the update is bit-identical;
    - amp, manual: the same, except that halving an FP16 gradient below FP16's normal range (2^-14) rounds:
      at most a few FP16 ulps on a few elements, within FP16's unit roundoff u = 2^-11 in norm;
    - manual-accumulate: four FP16 micro-batch gradients, summed ((a+b)+c)+d in one process and
      (a+b)+(c+d) over two ranks. Each order rounds at most three times, so they differ by at most 6u times
      the sum of the four gradients' magnitudes, element by element; the micro-batches of one step mostly agree
      in sign, so in norm that is within 6u of the update (0.7u measured here)."""
    _, results, _ = two_ranks
    rank0, one = results[f"{case}-one-step"][0], one_process[f"{case}-one-step"]
    _same_kernels(rank0, one)
    assert len(one["steps"]) == len(rank0["steps"]) == 1 and not one["steps"][0]["skipped"]
    _assert_same_first_loss(rank0["steps"][0]["loss"], one["steps"][0]["loss"], case)  # same weights, images
    expected, got = _update([one["before"], one["after"]]), _update([rank0["before"], rank0["after"]])
    assert expected.norm() > 0
    assert (got - expected).norm() <= bound * expected.norm(), ((got - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("case", ONE_STEP)
def test_two_processes_follow_one_with_the_same_global_batch(two_ranks, one_process, case):
    """Over six steps: the same losses in FP32 (each step's arithmetic is the same, see above); in half precision
    the same first loss and the same loss-scale decisions, but no loss comparison after the first step: a
    rounding difference in one update grows chaotically over the next ones (manual-accumulate, measured
    here: relative loss differences of 4e-5 at step 2, 1e-3 at step 4, 4e-3 at step 5)."""
    _, results, _ = two_ranks
    one, two = one_process[case], results[case][0]
    _same_kernels(two, one)
    one, two = one["steps"], two["steps"]
    assert len(one) == len(two) == 6
    _assert_same_first_loss(two[0]["loss"], one[0]["loss"], case)
    if case == "baseline":
        assert [s["loss"] for s in one] == [s["loss"] for s in two]
    assert [(s["skipped"], s["loss_scale"]) for s in one] == [(s["skipped"], s["loss_scale"]) for s in two]


def test_under_torchrun_only_rank_0_writes_the_run_and_records_the_world_size(two_ranks):
    out, results, stderr = two_ranks
    assert results["cli-exit"] == [0, 0]
    runs = list((out / "cli" / "runs").iterdir())
    assert len(runs) == 1
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["world_size"] == 2
    assert "x 2 processes (8 images each per step)" in (runs[0] / "train.log").read_text()
    assert stderr.count("run directory") == 1  # rank 1 does not log

"""Data-parallel training (train.devices, --nproc): two CPU processes (gloo) train the run of one
process, hold bit-identical weights, write checkpoints either process count resumes, stop
together, and fail with one clear error."""

import json
import math
import multiprocessing as mp
import os
import signal

import pandas as pd
import pytest
import torch

from mdmsearch.cli import main as cli_main
from mdmsearch.config import parse_run_config
from mdmsearch.diffusion import draws
from mdmsearch.errors import ProcessGroupError
from mdmsearch.training import StopTraining, Trainer, launch
from mdmsearch.training.distributed import SOLO, Ranks, init_group, leave_group

# a rank that dies before reporting must fail the test, not hang the suite
pytestmark = pytest.mark.timeout(300)

STEPS = 8
# agreement of 2 processes with 1 (same seed and global batch), measured on this 2-core machine
# (torch 2.10, gloo) for this config: training losses within 1e-11 relative, validation BPD
# within 1.1e-9 relative, the reported Q and D within 2.3e-10 after 8 steps, final val/test BPD
# within 2e-9 -- float summation order only, as every draw is the same.  Tolerance: 1e-6
# relative (a different CPU's kernels may round differently; still 100x below 1e-4).
RTOL = 1e-6


def _cfg(devices=1, steps=STEPS, **train):
    return parse_run_config({
        "process": {"name": "learned", "n_aux": 2}, "data": {"name": "digits"}, "model": {"size": "tiny"},
        "optim": {"batch_size": 16},
        "train": {"steps": steps, "eval_every": 1, "eval_examples": 37, "eval_batch_size": 16, "test_n_t": 2,
                  "time_sampler": "adaptive", "adaptive_refresh": 3, "n_samples": 0, "progress": False,
                  "devices": devices, **train}})


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: the run trained by one process."""
    return launch.run(_cfg(1), tmp_path_factory.mktemp("one"))


def _assert_same_run(ref, other):
    """Two runs agree step by step (training loss, validation BPD) within RTOL."""
    assert [r["step"] for r in other] == [r["step"] for r in ref]
    for a, b in zip(ref, other):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=RTOL), a["step"]
        assert b["val_bpd"] == pytest.approx(a["val_bpd"], rel=RTOL), a["step"]


def test_two_processes_train_the_run_of_one(one_process, tmp_path):
    """Same config, seed and global batch: the 2-process loss and validation curves and the final
    metrics are the 1-process ones; rank 0 alone wrote the run's files; its final per-example
    BPD are those one process computes on the same checkpoint (the evaluation's uneven last
    batches, 37 = 16 + 16 + 5 and 270 = 16 x 16 + 14, split between the two)."""
    two = launch.run(_cfg(2), tmp_path)
    assert two.completed and not mp.active_children()
    _assert_same_run(one_process.progress.history, two.progress.history)
    for key in ("val_bpd", "test_bpd", "prior_kl_per_dim"):
        assert two.metrics[key] == pytest.approx(one_process.metrics[key], rel=RTOL), key
    torch.testing.assert_close(torch.tensor(two.metrics["Q"]), torch.tensor(one_process.metrics["Q"]),
                               rtol=RTOL, atol=1e-8)
    assert json.loads((tmp_path / "metrics.json").read_text())["steps"] == STEPS
    alone = Trainer(_cfg(1), tmp_path)
    assert alone.try_resume()  # (the 2-process checkpoint, in one process)
    per_example = pd.read_parquet(tmp_path / "per_example.parquet")
    for split in ("val", "test"):
        mine = alone.evaluate(split, n_t=2)["per_example"]
        theirs = torch.tensor(per_example[per_example["split"] == split]["bpd"].to_numpy())
        torch.testing.assert_close(theirs, mine, rtol=RTOL, atol=1e-6)  # (measured: within 2e-7 bpd)


def _two_rank_steps(rank, world, port, out_dir, diverge, queue):
    """A spawned rank: 3 steps of the 2-process run (``diverge``: then rank 1 moves Q by ~an ulp);
    its Q, D, network weights and the replica check's error go to ``queue``."""
    torch.set_num_threads(1)
    store = torch.distributed.TCPStore("127.0.0.1", port, None, is_master=False)
    group = init_group(rank, world, torch.device("cpu"), store=store)
    try:
        tr = Trainer(_cfg(world), out_dir, group=group)
        for _ in range(3):
            tr.train_step()
        if rank == 1 and diverge:
            with torch.no_grad():
                tr.process_params[0].add_(1e-15)
        try:
            tr.group.check_replicas(tr._replicated(), tr.step)
            caught = None
        except ProcessGroupError as exc:
            caught = str(exc)
        arrays = [t.detach().numpy().copy() for t in (tr.process.Q, tr.process.D, *tr.net.parameters())]
        queue.put((rank, arrays, caught))  # (numpy: pickled by value, not through shared memory)
    finally:
        leave_group()


def _spawn_two(tmp_path, diverge=False):
    """Run :func:`_two_rank_steps` as ranks 0 and 1 in spawned processes: {rank: (Q, D, net, error)}."""
    ctx = mp.get_context("spawn")
    store = torch.distributed.TCPStore("127.0.0.1", 0, None, is_master=True, wait_for_workers=False)
    queue = ctx.SimpleQueue()
    procs = [ctx.Process(target=_two_rank_steps, args=(r, 2, store.port, str(tmp_path), diverge, queue))
             for r in (0, 1)]
    for p in procs:
        p.start()
    out = {}
    for _ in procs:
        rank, arrays, caught = queue.get()
        q, d, *net = (torch.from_numpy(a) for a in arrays)
        out[rank] = (q, d, net, caught)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return out


def test_both_ranks_hold_bit_identical_weights_and_a_difference_is_caught(tmp_path):
    """After steps with averaged gradients, Q, D and every network weight are the same bits on
    both ranks (the replica check passes); one rank off by an ulp fails the check on both."""
    same = _spawn_two(tmp_path / "same")
    (q0, d0, net0, err0), (q1, d1, net1, err1) = same[0], same[1]
    assert q0.dtype == torch.float64 and torch.equal(q0, q1) and torch.equal(d0, d1)
    assert all(torch.equal(a, b) for a, b in zip(net0, net1))
    assert err0 is None and err1 is None
    off = _spawn_two(tmp_path / "off", diverge=True)
    assert all("differ from rank 0" in off[r][3] for r in (0, 1))


@pytest.mark.parametrize("first,then", [(2, 1), (1, 2)], ids=["2-then-1", "1-then-2"])
def test_a_checkpoint_resumes_with_another_number_of_processes(one_process, tmp_path, first, then):
    """Half the steps with one process count, the rest with the other: the run of one process."""
    half = launch.run(_cfg(first, steps=STEPS // 2), tmp_path)
    assert half.completed and half.progress.step == STEPS // 2
    rest = launch.run(_cfg(then), tmp_path)  # (resume=True: the checkpoint in tmp_path)
    assert rest.completed and rest.progress.step == STEPS
    _assert_same_run(one_process.progress.history, rest.progress.history)
    assert rest.metrics["test_bpd"] == pytest.approx(one_process.metrics["test_bpd"], rel=RTOL)


def test_stop_training_from_the_callback_ends_every_process(tmp_path):
    """The pruner's StopTraining on rank 0 stops both processes at that evaluation; a replayed
    resume shows the callback the restored curve and stops there again."""
    seen = []

    def prune_at_2(step, metrics):
        seen.append(step)
        if step == 2:
            raise StopTraining("pruned at step 2")

    stopped = launch.run(_cfg(2), tmp_path, callback=prune_at_2)
    assert not stopped.completed and stopped.reason == "pruned at step 2" and stopped.progress.step == 2
    assert seen == [1, 2] and not mp.active_children()
    seen.clear()
    again = launch.run(_cfg(2), tmp_path, callback=prune_at_2, replay=True)
    assert not again.completed and seen == [1, 2] and again.progress.step == 2


def test_a_failing_callback_and_a_dead_rank_end_the_run_with_one_error(tmp_path):
    """An exception in rank 0's callback is rank 0's error (the other rank ends too); a rank
    killed mid-run makes rank 0 fail at once with a ProcessGroupError that names it."""
    def broken(step, metrics):
        raise RuntimeError("reporter broke")

    with pytest.raises(RuntimeError, match="reporter broke"):
        launch.run(_cfg(2), tmp_path / "broken", callback=broken)
    assert not mp.active_children()

    def kill_rank_1(step, metrics):
        if step == 2:
            for child in mp.active_children():
                os.kill(child.pid, signal.SIGKILL)

    with pytest.raises(ProcessGroupError, match=r"rank 1 died \(killed by signal 9\)"):
        launch.run(_cfg(2), tmp_path / "killed", callback=kill_rank_1)
    assert not mp.active_children()


@pytest.mark.parametrize("flags,needle", [
    (["--nproc", "0"], "--nproc 0 (train.devices): Input should be greater than 0"),
    (["--nproc", "3", "--batch-size", "16"], "--nproc 3 (train.devices): optim.batch_size 16 is not divisible by "
                                            "train.devices 3"),
])
def test_a_bad_nproc_is_one_clear_error(flags, needle, tmp_path, capsys, restore_logging):
    assert cli_main(["train", "--dataset", "digits", "--out", str(tmp_path / "o"), "-q", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "o" / "checkpoint.pt").exists()


def test_shards_draw_the_rows_of_the_whole_batch():
    """Each process's draws are its rows of the one-process draw, for even and uneven splits."""
    for total, world in ((16, 2), (5, 2), (14, 3)):
        full = torch.randn((total, 3, 4), generator=torch.Generator().manual_seed(0))
        rows = [draws.shard_rows(total, r, world) for r in range(world)]
        assert [r.stop - r.start for r in rows] == [len(c) for c in torch.tensor_split(torch.arange(total), world)]
        for r in rows:
            shard = draws.sharded(torch.Generator().manual_seed(0), r, total)
            assert torch.equal(draws.randn((r.stop - r.start, 3, 4), shard), full[r])
    gen = torch.Generator()
    assert SOLO.shard(gen, 16) is gen and draws.sharded(gen, slice(0, 16), 16) is gen
    assert isinstance(Ranks(1, 2, torch.device("cpu")).shard(gen, 16), draws.BatchShard)


def test_two_processes_from_the_command_line_then_one(tmp_path, capsys, restore_logging):
    """`mdmsearch train --nproc 2`, then `--resume --nproc 1` with a larger budget."""
    args = ["train", "--dataset", "digits", "--batch-size", "16", "--eval-every", "2", "--n-samples", "0",
            "--out", str(tmp_path), "-q"]
    assert cli_main([*args, "--steps", "2", "--nproc", "2"]) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["steps"] == 2 and math.isfinite(first["test_bpd"])
    assert cli_main([*args, "--steps", "4", "--nproc", "1", "--resume"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 4


def test_torchrun_starts_the_same_run(tmp_path):
    """Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK set) every process joins torchrun's group:
    one JSON line from rank 0, and the numbers of one process."""
    import subprocess
    import sys
    from pathlib import Path

    args = ["train", "--dataset", "digits", "--process", "learned", "--n-aux", "1", "--batch-size", "16",
            "--steps", "4", "--eval-every", "2", "--n-samples", "0", "-q"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "mdmsearch.cli",
                          *args, "--out", str(tmp_path / "two")], capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    lines = [json.loads(line) for line in two.stdout.strip().splitlines()]
    one = launch.run(parse_run_config({"data": {"name": "digits"}, "process": {"name": "learned", "n_aux": 1},
                                       "optim": {"batch_size": 16}, "train": {"steps": 4, "eval_every": 2,
                                                                              "n_samples": 0, "progress": False}}),
                     tmp_path / "one")
    assert len(lines) == 1 and lines[0]["steps"] == 4
    for key in ("val_bpd", "test_bpd"):
        assert lines[0][key] == pytest.approx(one.metrics[key], rel=RTOL)


def test_a_search_trains_its_trials_on_budget_devices_processes(tmp_path):
    """`budget.devices: 2` in a spec: each trial trains on two processes (its config says so) and
    reports the value one process reports, within RTOL; the study's identity (spec hash) and the
    trials' configuration hashes do not depend on it, and Ray trials hold a CPU per process."""
    from mdmsearch.search.ray_executor import trial_resources
    from mdmsearch.search.runner import run_local
    from mdmsearch.search.spec import SearchSpec
    from mdmsearch.search.study import make_storage

    import optuna
    import yaml

    def study(devices: int, name: str):
        spec = SearchSpec.model_validate({
            "study": name, "studies_dir": str(tmp_path / "studies"), "data": {"name": "digits"},
            "model": {"name": "unet", "size": "tiny"}, "sampler": {"name": "random"}, "pruner": {"name": "none"},
            "budget": {"steps": 6, "eval_every": 3, "eval_examples": 32, "batch_size": 16, "n_samples": 0,
                       "test_n_t": 2, "devices": devices},
            "baselines": ["cld"], "n_trials": 1, "workers": 1})
        run_local(spec)
        trial = optuna.load_study(study_name=name, storage=make_storage(f"journal:{spec.study_dir / 'journal.log'}")).trials[0]
        return spec, trial

    one_spec, one = study(1, "one")
    two_spec, two = study(2, "two")
    assert one_spec.spec_hash() == two_spec.model_copy(update={"study": "one"}).spec_hash()
    assert one.user_attrs["config_hash"] == two.user_attrs["config_hash"]
    assert math.isclose(two.values[0], one.values[0], rel_tol=RTOL)
    saved = yaml.safe_load((tmp_path / "studies" / "two" / "trials" / "0" / "config.yaml").read_text())
    assert saved["train"]["devices"] == 2
    assert trial_resources(two_spec)["cpu"] == 2
    with pytest.raises(Exception, match="set resources.gpu to 2"):
        trial_resources(two_spec.model_copy(update={"resources": {"cpu": 1, "gpu": 1}}))

"""A study on a two-node Ray cluster (``ray.cluster_utils.Cluster``: a head and a worker node,
each a separate raylet with one CPU, on loopback): trials run on both nodes, each writes its
row and tells the study; then the worker node is killed while one of its trials trains: Tune
restarts that trial (the same Optuna trial, its checkpoint in the shared artifact directory) on
the surviving node, and the study finishes with every row once."""

import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml

from mdmsearch.search.record import TrialRecord
from mdmsearch.search.study import make_storage

HAVE_RAY = importlib.util.find_spec("ray") is not None

SPEC = {
    "study": "two-nodes",
    "data": {"name": "digits"},
    "model": {"name": "unet", "size": "tiny"},
    "budget": {"steps": 200, "eval_every": 25, "eval_examples": 32, "batch_size": 16, "n_samples": 0,
               "test_n_t": 4},
    "sampler": {"name": "random", "seed": 0},
    "pruner": {"name": "none"},
    "structure": {"n_aux": [1, 2], "q_patterns": ["full", "chain"], "d_patterns": ["full", "last"]},
    "baselines": ["vpsde"],
    "resources": {"cpu": 1},
    "n_trials": 4,
    "workers": 2,
}


def _records(studies: Path) -> list[TrialRecord]:
    journal = studies / "two-nodes" / "journal.log"
    if not journal.exists():
        return []
    try:
        study = optuna.load_study(study_name="two-nodes", storage=make_storage(f"journal:{journal}"))
    except KeyError:  # the driver is creating it
        return []
    return [TrialRecord.of(t) for t in study.trials]


def _wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {what}: {proc.communicate()[1][-3000:]}")
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_RAY, reason="Ray is not installed")
def test_two_node_cluster_runs_trials_on_both_and_survives_a_node_kill(tmp_path, monkeypatch):
    from ray.cluster_utils import Cluster

    ray_tmp = tempfile.mkdtemp(prefix="mdmray", dir="/tmp")  # short: Ray's socket paths
    for key, value in {"RAY_TMPDIR": ray_tmp, "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(key, value)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"head": 1}})
    worker = cluster.add_node(num_cpus=1, resources={"second": 1})
    cluster.wait_for_nodes()
    head_id, worker_id = cluster.head_node.node_id, worker.node_id
    studies = tmp_path / "studies"
    try:
        spec = tmp_path / "spec.yaml"
        spec.write_text(yaml.safe_dump(SPEC, sort_keys=False))
        proc = subprocess.Popen([sys.executable, "-m", "mdmsearch.cli", "run", str(spec), "--executor", "ray",
                                 "--address", cluster.address, "--studies-dir", str(studies)],
                                cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        def running_on_both():
            running = [r for r in _records(studies) if r.state.name == "RUNNING" and r.worker]
            nodes = {r.worker.get("ray_node") for r in running}
            on_worker = [r for r in running if r.worker.get("ray_node") == worker_id]
            return on_worker[0] if {head_id, worker_id} <= nodes else None

        victim = _wait_for(running_on_both, 300, "trials running on both nodes", proc)
        checkpoint = Path(victim.artifact_dir) / "checkpoint.pt"
        _wait_for(checkpoint.exists, 120, f"trial {victim.number}'s first checkpoint", proc)
        cluster.remove_node(worker, allow_graceful=False)  # the worker node dies mid-trial
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        cluster.shutdown()

    records = {r.number: r for r in _records(studies)}
    rows = pd.read_parquet(studies / "leaderboard" / "dataset=digits" / "study=two-nodes")
    decided = {n for n, r in records.items() if r.decided}
    assert rows["trial"].is_unique and set(rows["trial"]) == decided and len(decided) >= SPEC["n_trials"]
    assert not [r for r in records.values() if r.state.name in ("RUNNING", "WAITING")]
    assert all(records[n].outcome.value == s for n, s in zip(rows["trial"], rows["state"]))
    # the killed trial: restarted by Tune on the surviving node as the same Optuna trial, told once
    after = records[victim.number]
    assert after.decided and after.worker["ray_node"] == head_id
    history = pd.read_csv(Path(victim.artifact_dir) / "history.csv")
    assert history["step"].is_unique and history["step"].max() == SPEC["budget"]["steps"]  # trained to the end
    assert victim.worker["ray_node"] == worker_id  # (placed on both nodes: seen while they ran)

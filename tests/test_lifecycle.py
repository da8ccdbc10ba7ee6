"""The shared trial life cycle: outcomes, how they are told to Optuna, paths, claims, deadlines."""

import json
import time

import optuna
import pytest
import torch
from optuna.trial import TrialState

from mdmsearch.errors import CholeskyError
from mdmsearch.search.lifecycle import Deadline, Outcome, artifact_dir, claim, row_path, tell
from mdmsearch.search.spec import SearchSpec


@pytest.fixture
def spec(tmp_path):
    return SearchSpec.model_validate({"study": "lc", "studies_dir": str(tmp_path / "studies")})


@pytest.mark.parametrize("state, values, told", [
    (Outcome.COMPLETE, [2.0], TrialState.COMPLETE),
    (Outcome.DUPLICATE, [2.0], TrialState.COMPLETE),  # a duplicate of a complete trial: its value
    (Outcome.DUPLICATE, None, TrialState.PRUNED),  # a duplicate of a pruned trial: pruned again
    (Outcome.PRUNED, None, TrialState.PRUNED),
    (Outcome.FAIL, None, TrialState.FAIL),
    (Outcome.INVALID, None, TrialState.PRUNED),  # (TPE ignores failed trials, not pruned ones)
    ("COMPLETE", [1.5], TrialState.COMPLETE),  # rows store the plain string
])
def test_every_outcome_is_told_one_way(state, values, told):
    study = optuna.create_study()
    trial = study.ask()
    tell(study, trial, state, values)
    frozen = study.trials[0]
    assert frozen.state == told and (frozen.values == values if values else frozen.values is None)


def test_claim_records_the_artifact_dir_attrs_and_a_heartbeat(spec):
    study = optuna.create_study()
    trial = claim(study, spec)
    art = spec.study_dir / "trials" / "0"
    assert trial.user_attrs["artifact_dir"] == str(art)
    assert json.loads((art / "heartbeat.json").read_text())["trial"] == 0
    # a retry is enqueued with its first attempt's artifact id: it resumes that directory
    study.enqueue_trial({}, user_attrs={"artifact_id": 0, "retry_of": 0})
    retry = claim(study, spec)
    assert retry.number == 1 and artifact_dir(spec, retry) == art
    assert row_path(spec, 7) == spec.leaderboard_root / "dataset=digits" / "study=lc" / "trial-7.parquet"


def test_recover_tells_a_written_row_and_requeues_the_rest(spec):
    """A dead worker's RUNNING trial: told from its leaderboard row when it wrote one (no
    retraining), else failed and re-queued to resume from its checkpoint; a live one is left."""
    import os

    from mdmsearch.leaderboard import write_trial
    from mdmsearch.search.lifecycle import recover
    from mdmsearch.search.study import FINAL_ATTR

    study = optuna.create_study()
    with_row, without_row, alive = (claim(study, spec) for _ in range(3))
    dead = _dead_pid()
    for t in (with_row, without_row):
        hb = artifact_dir(spec, t) / "heartbeat.json"
        hb.write_text(json.dumps({**json.loads(hb.read_text()), "pid": dead}))
    with_row.set_user_attr(FINAL_ATTR, True)
    write_trial(spec.leaderboard_root, spec.data.name, spec.study,
                {"trial": with_row.number, "state": "COMPLETE", "val_bpd": 1.25})
    assert recover(study, spec) == [without_row.number]
    states = {t.number: t.state for t in study.trials}
    assert states[with_row.number] == TrialState.COMPLETE and study.trials[with_row.number].values == [1.25]
    assert states[without_row.number] == TrialState.FAIL and states[alive.number] == TrialState.RUNNING
    retry = study.trials[-1]
    assert retry.state == TrialState.WAITING and retry.user_attrs["retry_of"] == without_row.number
    assert os.getpid() != dead


def test_a_claim_orphaned_before_its_first_heartbeat_is_recovered(spec, monkeypatch):
    """A claimer killed between the ask and its first heartbeat leaves a RUNNING trial with an
    artifact directory and no heartbeat file: recovered after HEARTBEAT_SECONDS, not after
    STALE_SECONDS (a resumed run counted it as running elsewhere and stopped one trial short)."""
    from mdmsearch.search import study as study_mod
    from mdmsearch.search.lifecycle import recover

    study = optuna.create_study()
    orphan = claim(study, spec)
    study_mod.heartbeat_path(artifact_dir(spec, orphan)).unlink()  # killed before the beat
    frozen = study.trials[orphan.number]
    start = frozen.datetime_start.timestamp()
    beat = study_mod.HEARTBEAT_SECONDS
    assert beat < study_mod.STALE_SECONDS
    assert not study_mod.is_stale(frozen, now=start + 0.5 * beat)  # a claim may be in progress elsewhere
    assert study_mod.is_stale(frozen, now=start + 2 * beat)
    bare = study.ask()  # asked outside claim (no artifact dir): the long grace
    assert not study_mod.is_stale(study.trials[bare.number], now=start + 2 * beat)
    assert recover(study, spec) == []  # too young yet
    monkeypatch.setattr(study_mod, "HEARTBEAT_SECONDS", 0.05)
    time.sleep(0.1)
    assert recover(study, spec) == [orphan.number]
    assert study.trials[orphan.number].state == TrialState.FAIL
    assert study.trials[-1].user_attrs["retry_of"] == orphan.number
    assert study.trials[bare.number].state == TrialState.RUNNING


def _dead_pid() -> int:
    """The pid of a process that has exited."""
    import subprocess

    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_deadline():
    assert not Deadline(None).passed()
    d = Deadline(0.05)
    assert not d.passed()
    time.sleep(0.06)
    assert d.passed()


def test_cholesky_error_carries_its_data():
    from mdmsearch.diffusion.presets import preset

    proc = preset("cld")
    bad = -torch.eye(proc.n, dtype=torch.float64).expand(2, -1, -1)
    with pytest.raises(CholeskyError) as info:
        proc.cholesky(bad, torch.tensor([0.5, 1.0], dtype=torch.float64))
    err = info.value
    assert err.t == 0.5 and err.process == "cld" and len(err.Q) == proc.n and len(err.D) == proc.n
    assert err.where == "at t=0.5 for process 'cld'" and err.where in str(err)


def test_checkpoint_step_reads_the_step_or_none(tmp_path):
    from mdmsearch.training.checkpoint import checkpoint_step, save_checkpoint

    path = tmp_path / "checkpoint.pt"
    assert checkpoint_step(path) is None  # missing
    save_checkpoint(path, {"step": 7, "net": {"w": torch.zeros(3)}})
    assert checkpoint_step(path) == 7
    path.write_bytes(path.read_bytes()[:40])  # cut short
    assert checkpoint_step(path) is None


def test_a_row_without_the_final_attribute_still_decides_the_trial(spec):
    """A worker killed between writing its row and recording the outcome on the trial: the row
    decides it (told from the row, attributes set), so no orphan row and no retraining."""
    from mdmsearch.leaderboard import write_trial
    from mdmsearch.search.lifecycle import recover
    from mdmsearch.search.study import FINAL_ATTR

    study = optuna.create_study()
    trial = claim(study, spec)
    _mark_dead(spec, trial)
    write_trial(spec.leaderboard_root, spec.data.name, spec.study,
                {"trial": trial.number, "state": "PRUNED", "reason": "pruned at step 10", "steps": 10})
    assert recover(study, spec) == []
    frozen = study.trials[trial.number]
    assert frozen.state == TrialState.PRUNED and len(study.trials) == 1
    assert frozen.user_attrs[FINAL_ATTR] and frozen.user_attrs["outcome"] == "PRUNED"
    assert frozen.user_attrs["reason"] == "pruned at step 10" and frozen.user_attrs["steps"] == 10


@pytest.mark.parametrize("damage", ["unreadable", "older than the trial"])
def test_a_row_that_is_not_the_trials_is_set_aside_and_the_trial_retried(spec, damage):
    """A damaged row file, or one left by an earlier study of the same name, cannot outlive the
    retry as an orphan: it is moved aside (kept for inspection) and the trial re-queued."""
    from datetime import datetime, timedelta, timezone

    from mdmsearch.leaderboard import write_trial
    from mdmsearch.search.lifecycle import recover

    study = optuna.create_study()
    trial = claim(study, spec)
    _mark_dead(spec, trial)
    path = row_path(spec, trial.number)
    if damage == "unreadable":
        path.parent.mkdir(parents=True)
        path.write_bytes(b"PAR1 torn")
    else:
        write_trial(spec.leaderboard_root, spec.data.name, spec.study,
                    {"trial": trial.number, "state": "COMPLETE", "val_bpd": 1.0,
                     "started_at": datetime.now(timezone.utc) - timedelta(days=3)})
    assert recover(study, spec) == [trial.number]
    assert study.trials[trial.number].state == TrialState.FAIL and study.trials[-1].state == TrialState.WAITING
    assert not path.exists() and len(list(path.parent.glob(f"{path.name}.corrupt-*"))) == 1


def _mark_dead(spec, trial) -> None:
    """Make ``trial``'s heartbeat name a process that has exited (its worker died)."""
    hb = artifact_dir(spec, trial) / "heartbeat.json"
    hb.write_text(json.dumps({**json.loads(hb.read_text()), "pid": _dead_pid()}))

"""The private names mdmsearch uses (all in mdmsearch/search/adapters.py) still exist on the
installed versions, and those versions are the ones they were checked on."""

import importlib.metadata

import optuna
import pytest

from mdmsearch.search import adapters

try:
    import ray  # noqa: F401

    HAVE_RAY = True
except ImportError:  # pragma: no cover
    HAVE_RAY = False


def _minor(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


@pytest.mark.parametrize("package", ["optuna"] + (["ray"] if HAVE_RAY else []))
def test_installed_versions_are_the_checked_ones(package):
    low, high = (_minor(v) for v in adapters.CHECKED_ON[package])
    installed = importlib.metadata.version(package)
    assert low <= _minor(installed) <= high, (
        f"{package} {installed} is outside the range {adapters.CHECKED_ON[package]} that "
        "mdmsearch/search/adapters.py was checked on: check its private names, then widen the range")


def test_optuna_private_names():
    study = optuna.create_study()
    trial = study.ask()
    tid = adapters.trial_id(trial)
    assert tid == adapters.trial_id(study.trials[0])
    adapters.set_trial_attr(study, tid, "k", 1)
    assert adapters.trial_attrs(study, tid) == {"k": 1}
    again = adapters.reopen_trial(study, tid)
    again.report(0.5, 3)
    assert study.trials[0].intermediate_values == {3: 0.5}
    adapters.fail_trial(study, tid)
    assert study.trials[0].state == optuna.trial.TrialState.FAIL


@pytest.mark.skipif(not HAVE_RAY, reason="Ray not installed")
def test_ray_private_names():
    from ray.tune.search.optuna import OptunaSearch

    def space(trial):
        trial.suggest_float("x", 0.0, 1.0)
        return {"const": 1}

    searcher = OptunaSearch(space=space, metric="loss", mode="min", sampler=optuna.samplers.RandomSampler(seed=0))
    study = adapters.searcher_study(searcher)
    ot_trial = study.ask()
    adapters.searcher_trials(searcher)["t1"] = ot_trial
    config = adapters.searcher_config(searcher, ot_trial)
    assert set(config) == {"x", "const"} and 0.0 <= config["x"] <= 1.0
    adapters.searcher_completed(searcher, "t1")
    assert adapters.training_thread() is None  # outside a trainable: no session
    cls = adapters.function_trainable(lambda config: None, name="probe")
    assert callable(getattr(cls, "cleanup"))

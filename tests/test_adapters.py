"""The private names mdmsearch uses (all in mdmsearch/search/adapters.py): the versions
pyproject.toml declares are exactly the ones they were checked on, and each name does what the
search relies on, tested by behaviour against real storages, so that a new release of Optuna
fails here on a named behaviour, not in a user's study."""

import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from packaging.requirements import Requirement
from packaging.version import Version

from mdmsearch.search import adapters
from mdmsearch.search.study import make_storage

tomllib = pytest.importorskip("tomllib")  # (Python >= 3.11)
ROOT = Path(__file__).resolve().parents[1]


def _requirements() -> dict[str, list[Requirement]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    reqs += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    by_name: dict[str, list[Requirement]] = {}
    for r in reqs:
        by_name.setdefault(r.name, []).append(r)
    return by_name


def _next_minor(version: str) -> str:
    v = Version(version)
    return f"{v.major}.{v.minor + 1}"


@pytest.mark.parametrize("package", sorted(adapters.CHECKED_ON))
def test_declared_versions_are_the_checked_ones(package):
    """pyproject.toml's bounds are CHECKED_ON's range, in every place the package is required,
    so pip never installs a version the adapters were not checked on."""
    low, high = adapters.CHECKED_ON[package]
    reqs = _requirements()[package]
    expected = {f">={low}", f"<{_next_minor(high)}"}
    for r in reqs:
        assert {str(s) for s in r.specifier} == expected, (
            f"pyproject.toml requires {r}, but adapters.CHECKED_ON says {package} was checked on {low}..{high}")
    # a checked version is allowed, the next minor is not
    assert all(r.specifier.contains(f"{high}.0") and not r.specifier.contains(f"{_next_minor(high)}.0") for r in reqs)


def test_the_installed_optuna_is_in_the_declared_range():
    """What pip installed obeys what the project declares (a stale environment is told here)."""
    installed = Version(optuna.__version__)
    (req,) = _requirements()["optuna"]
    assert req.specifier.contains(installed), f"optuna {installed} installed, pyproject.toml requires {req}"


@pytest.fixture(scope="module")
def pg_server():
    from pgserver import PgServer, missing_reason

    if missing_reason():
        pytest.skip(missing_reason())
    server = PgServer().start()
    yield server
    server.stop()


@pytest.fixture(params=["journal", "sqlite", "postgresql"])
def storage_url(request, tmp_path):
    if request.param == "journal":
        return f"journal:{tmp_path / 'journal.log'}"
    if request.param == "postgresql":  # a real server (tests/pgserver.py); skipped without one
        server = request.getfixturevalue("pg_server")
        return server.create_db(f"adapters_{abs(hash(request.node.name)) % 10**8}")
    return f"sqlite:///{tmp_path / 'optuna.db'}"


def _study(url: str) -> optuna.Study:
    return optuna.create_study(study_name="adapters", storage=make_storage(url), load_if_exists=True)


def test_trial_ids_of_live_and_frozen_trials(storage_url):
    study = _study(storage_url)
    asked = [study.ask() for _ in range(3)]
    ids = [adapters.trial_id(t) for t in asked]
    assert len(set(ids)) == 3 and all(isinstance(i, int) for i in ids)
    assert ids == [adapters.trial_id(t) for t in study.get_trials(deepcopy=False)]


def test_attributes_are_read_and_written_by_id(storage_url):
    study = _study(storage_url)
    trial = study.ask()
    tid = adapters.trial_id(trial)
    adapters.set_trial_attr(study, tid, "k", {"nested": [1, 2]})
    adapters.set_trial_attr(study, tid, "k2", "v")
    assert adapters.trial_attrs(study, tid) == {"k": {"nested": [1, 2]}, "k2": "v"}
    reloaded = optuna.load_study(study_name="adapters", storage=make_storage(storage_url))
    assert reloaded.trials[0].user_attrs == {"k": {"nested": [1, 2]}, "k2": "v"}  # persisted, not cached


def test_a_trial_asked_here_is_reopened_reported_and_told_by_another_process(storage_url):
    """What a Ray trial does: the driver asks, another process reopens the trial by id,
    reports intermediate values (pruner), sets attributes and tells it."""
    study = _study(storage_url)
    trial = study.ask()
    tid = adapters.trial_id(trial)
    code = textwrap.dedent(f"""
        import optuna
        from mdmsearch.search import adapters
        from mdmsearch.search.study import make_storage
        # (the random sampler reads no trials before a suggest, so a database storage's cache
        # knows only what reopen_trial made it read)
        study = optuna.load_study(study_name="adapters", storage=make_storage({storage_url!r}),
                                  sampler=optuna.samplers.RandomSampler())
        trial = adapters.reopen_trial(study, {tid})
        assert trial.number == 0, trial.number
        assert trial.suggest_categorical("x", ["a", "b"]) in ("a", "b")  # (a database storage's cache)
        trial.report(0.75, 10)
        trial.report(0.5, 20)
        trial.set_user_attr("by", "child")
        study.tell(trial, 0.5)
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    frozen = optuna.load_study(study_name="adapters", storage=make_storage(storage_url)).trials[0]
    assert frozen.state == TrialState.COMPLETE and frozen.values == [0.5]
    assert frozen.intermediate_values == {10: 0.75, 20: 0.5} and frozen.user_attrs == {"by": "child"}


def test_a_running_trial_is_failed_by_id_and_a_finished_one_refuses(storage_url):
    study = _study(storage_url)
    running, finished = study.ask(), study.ask()
    study.tell(finished, 1.0)
    adapters.fail_trial(study, adapters.trial_id(running))
    assert study.trials[running.number].state == TrialState.FAIL
    with pytest.raises(RuntimeError):  # what retry_trial relies on: finished meanwhile elsewhere
        adapters.fail_trial(study, adapters.trial_id(finished))
    assert study.trials[finished.number].state == TrialState.COMPLETE
    with pytest.raises(RuntimeError):  # and attributes of a finished trial stay as they were
        adapters.set_trial_attr(study, adapters.trial_id(finished), "late", 1)


def test_a_reopened_trial_feeds_the_pruner(storage_url):
    """The pruner of the process that reopened a trial sees the other trials' curves."""
    study = optuna.create_study(study_name="adapters", storage=make_storage(storage_url),
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0))
    good = study.ask()
    good.report(1.0, 10)
    study.tell(good, 1.0)
    bad = adapters.reopen_trial(study, adapters.trial_id(study.ask()))
    bad.report(5.0, 10)
    assert bad.should_prune()


def test_the_ray_executor_uses_no_private_ray_names():
    """Every private name lives in adapters.py; the Ray executor itself imports public Tune only."""
    import ast

    import mdmsearch.search.ray_executor as mod

    tree = ast.parse(Path(mod.__file__).read_text())
    modules = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    modules += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in modules if m.startswith("ray") and ("._" in m or "_internal" in m)], modules
    private = [n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr.startswith("_")
               and not n.attr.startswith("__") and not (isinstance(n.value, ast.Name) and n.value.id in ("self", "os"))]  # (os._exit is public)
    assert private == [], private  # (the searcher's own attributes are self._...)


def test_the_adapters_hold_no_ray_names():
    """No private Ray name is needed any more (the executor is public Tune only)."""
    import inspect

    src = inspect.getsource(adapters)
    assert "from ray" not in src and "import ray" not in src, "a Ray name came back into adapters.py"

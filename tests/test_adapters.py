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
def test_the_ray_executor_uses_no_private_ray_names():
    """Every private name lives in adapters.py; the Ray executor itself imports public Tune only."""
    import ast
    from pathlib import Path

    import mdmsearch.search.ray_executor as mod

    tree = ast.parse(Path(mod.__file__).read_text())
    modules = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    modules += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in modules if m.startswith("ray") and ("._" in m or "_internal" in m)], modules
    private = [n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr.startswith("_")
               and not n.attr.startswith("__") and not (isinstance(n.value, ast.Name) and n.value.id == "self")]
    assert private == [], private  # (the searcher's own attributes are self._...)


def test_the_adapters_hold_no_ray_names():
    """No private Ray name is needed any more (the executor is public Tune only)."""
    import inspect

    src = inspect.getsource(adapters)
    assert "from ray" not in src and "import ray" not in src, "a Ray name came back into adapters.py"

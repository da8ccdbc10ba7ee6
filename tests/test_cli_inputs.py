"""Bad inputs at the front door: every one is a single line on stderr, exit code 2, no
traceback, and nothing created on disk.  Each case runs the real CLI in its own process and
its own empty directory; the cases run concurrently (a module fixture) to keep this fast, and
the parametrized test checks one case each."""

import importlib.util
import os
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SPEC = "study: s\nbudget: {steps: 2, eval_every: 1}\nbaselines: [vpsde]\nn_trials: 1\n"
RUN_CONFIG = "process: {name: learned, n_aux: 1}\ntrain: {steps: 2}\n"
NO_DRIVER = next(u for u in ("postgresql://u:secret@localhost/db", "mssql+pyodbc://u:secret@localhost/db",
                             "oracle+oracledb://u:secret@localhost/db")
                 if importlib.util.find_spec({"postgresql": "psycopg", "mssql+pyodbc": "pyodbc",
                                              "oracle+oracledb": "oracledb"}[u.split(":")[0]]) is None)

# a port that accepts connections and never answers (not a Ray head), open while the module runs
SILENT = socket.socket()
SILENT.bind(("127.0.0.1", 0))
SILENT.listen(16)
SILENT_ADDRESS = f"127.0.0.1:{SILENT.getsockname()[1]}"
QUALITY_SPEC = SPEC.replace("budget: {steps: 2, eval_every: 1}", "budget: {steps: 2, eval_every: 1, quality: {features: %s}}")

# id -> (files to write {name: text}, argv, text the one line must contain)
CASES = {
    # the spec file
    "spec-missing": ({}, ["run", "nope.yaml"], "no such spec file"),
    "spec-invalid-yaml": ({"s.yaml": "study: x\nbudget: [unclosed\n"}, ["run", "s.yaml"], "line 3: invalid YAML"),
    "spec-empty": ({"s.yaml": ""}, ["run", "s.yaml"], "empty spec"),
    "spec-not-a-mapping": ({"s.yaml": "- a\n- b\n"}, ["run", "s.yaml"], "top level must be a mapping"),
    "spec-duplicate-key": ({"s.yaml": SPEC + "n_trials: 3\n"}, ["run", "s.yaml"], "duplicate key 'n_trials' (first on line 4)"),
    "spec-unknown-key": ({"s.yaml": SPEC + "colour: blue\n"}, ["run", "s.yaml"], "colour (line 5): unknown key"),
    "spec-study-name-space": ({"s.yaml": SPEC.replace("study: s", "study: a b")}, ["run", "s.yaml"],
                              "study name 'a b' may only use"),
    "spec-resource-typo": ({"s.yaml": SPEC + "resources: {gpus: 1}\n"}, ["run", "s.yaml"],
                           "unknown resource key(s) ['gpus']"),
    "spec-n-aux-limit": ({"s.yaml": SPEC + "structure: {n_aux: [7]}\n"}, ["run", "s.yaml"], "n_aux values must be in 0..6"),
    "spec-unknown-dataset": ({"s.yaml": SPEC + "data: {name: nope}\n"}, ["run", "s.yaml"], "data.name (line 5): unknown dataset"),
    "run-config-given-to-run": ({"r.yaml": RUN_CONFIG}, ["run", "r.yaml"], "this is a run config"),
    # flags of run: the error names the flag, not a YAML line
    "flag-n-trials": ({"s.yaml": SPEC}, ["run", "s.yaml", "--n-trials", "-3"], "--n-trials -3 (n_trials)"),
    "flag-dataset": ({"s.yaml": SPEC}, ["run", "s.yaml", "--dataset", "fooset"], "--dataset fooset (data.name)"),
    "flag-workers": ({"s.yaml": SPEC}, ["run", "s.yaml", "--workers", "0"], "--workers 0"),
    "flag-address-malformed": ({"s.yaml": SPEC}, ["run", "s.yaml", "--executor", "ray", "--address", "headnode"],
                               "--address headnode: expected HOST:PORT"),
    "flag-address-refused": ({"s.yaml": SPEC}, ["run", "s.yaml", "--executor", "ray", "--address", "127.0.0.1:9"],
                             "--address 127.0.0.1:9: cannot reach a Ray cluster there"),
    "flag-address-silent": ({"s.yaml": SPEC}, ["run", "s.yaml", "--executor", "ray", "--address", SILENT_ADDRESS],
                            f"--address {SILENT_ADDRESS}: no Ray cluster answered within"),
    "flag-not-an-int": ({"s.yaml": SPEC}, ["run", "s.yaml", "--n-trials", "abc"], "invalid int value: 'abc'"),
    "flag-address-without-ray": ({"s.yaml": SPEC}, ["run", "s.yaml", "--address", "auto"], "--address auto: only with"),
    # storage
    "storage-not-a-url": ({"s.yaml": SPEC}, ["run", "s.yaml", "--storage", "notaurl"], "--storage notaurl: not a storage URL"),
    "storage-no-driver": ({"s.yaml": SPEC}, ["run", "s.yaml", "--storage", NO_DRIVER], "is not installed"),
    "storage-malformed-mysql": ({"s.yaml": SPEC}, ["run", "s.yaml", "--storage", "mysql://u@h:port/db"],
                                "malformed database URL"),
    "storage-unknown-dialect": ({"s.yaml": SPEC}, ["run", "s.yaml", "--storage", "nosuchdb://h/db"],
                                "unknown database dialect"),
    "storage-sqlite-no-dir": ({"s.yaml": SPEC}, ["run", "s.yaml", "--storage", "sqlite:////nonexistent/mdm/x.db"],
                              "directory /nonexistent/mdm does not exist"),
    "storage-journal-empty": ({"s.yaml": SPEC}, ["run", "s.yaml", "--storage", "journal:"], "'journal:' has no file path"),
    "storage-journal-dir": ({"s.yaml": SPEC, "d/keep": ""}, ["run", "s.yaml", "--storage", "journal:d"], "is a directory"),
    "storage-journal-under-file": ({"s.yaml": SPEC, "f": ""}, ["run", "s.yaml", "--storage", "f/journal.log"],
                                   "directory f: exists and is not a directory"),
    # directories
    "studies-dir-proc": ({"s.yaml": SPEC}, ["run", "s.yaml", "--studies-dir", "/proc/mdmsearch-studies"],
                         "--studies-dir /proc/mdmsearch-studies: cannot write"),
    "studies-dir-under-file": ({"s.yaml": SPEC, "f": ""}, ["run", "s.yaml", "--studies-dir", "f/studies"], "is a file"),
    "studies-dir-is-file": ({"s.yaml": SPEC, "f": ""}, ["run", "s.yaml", "--studies-dir", "f"], "not a directory"),
    # data: the same failure for every trial is a setup error
    "data-mnist-missing": ({"s.yaml": SPEC + "data: {name: mnist, data_dir: empty}\n", "empty/keep": ""},
                           ["run", "s.yaml"], "mnist: no local files"),
    "data-mnist-corrupt": ({"s.yaml": SPEC + "data: {name: mnist, data_dir: bad}\n",
                            "bad/t10k-images-idx3-ubyte": "garbage"}, ["run", "s.yaml"], "corrupted IDX file"),
    # status / leaderboard / logging
    "status-not-a-url": ({}, ["status", "s", "--storage", "notaurl"], "not a storage URL"),
    "status-no-study": ({}, ["status", "s"], "no study 's'"),
    "leaderboard-empty": ({}, ["leaderboard", "--root", "nothing"], "no leaderboard results"),
    "log-file-no-dir": ({}, ["status", "s", "--log-file", "nodir/x.log"], "--log-file nodir/x.log"),
    # train: run configs and their flags, validated before the data loads
    "train-preset-with-n-aux": ({}, ["train", "--out", "o", "--process", "cld", "--n-aux", "3"],
                                "n_aux=3: only for learned processes"),
    "train-mask-pattern": ({}, ["train", "--out", "o", "--process", "learned", "--q-mask", "star"],
                           "unknown pattern 'star'"),
    "train-mask-3x3-for-k1": ({"r.yaml": "process: {name: learned, n_aux: 1, d_mask: [[1,0,0],[0,1,0],[0,0,1]]}\n"},
                              ["train", "r.yaml", "--out", "o"], "d_mask: must be 2 x 2"),
    "train-mask-ragged": ({"r.yaml": "process: {name: learned, n_aux: 1, q_mask: [[0,1],[0]]}\n"},
                          ["train", "r.yaml", "--out", "o"], "q_mask: must be 2 x 2"),
    "train-n-aux-limit": ({}, ["train", "--out", "o", "--process", "learned", "--n-aux", "7"], "--n-aux 7 (process.n_aux)"),
    "train-spec-given": ({"s.yaml": SPEC}, ["train", "s.yaml", "--out", "o"], "this is a search spec"),
    "train-empty-config": ({"r.yaml": ""}, ["train", "r.yaml", "--out", "o"], "empty run config"),
    "train-duplicate-key": ({"r.yaml": RUN_CONFIG + "train: {steps: 3}\n"}, ["train", "r.yaml", "--out", "o"],
                            "duplicate key 'train'"),
    "train-out-under-file": ({"f": ""}, ["train", "--out", "f/o", "--steps", "1"], "--out f/o"),
    "train-resume-no-checkpoint": ({}, ["train", "--out", "o", "--resume"], "--resume: no checkpoint to resume in o"),
    "train-resume-empty-dir": ({"o/keep": ""}, ["train", "--out", "o", "--resume", "--steps", "5"],
                               "--resume: no checkpoint to resume in o"),
    "train-quality-unknown-features": ({"r.yaml": "train: {steps: 2, quality: {features: resnet9000}}\n"},
                                       ["train", "r.yaml", "--out", "o"], "unknown features 'resnet9000'"),
    "train-quality-no-inception-weights": ({"r.yaml": "train: {steps: 2, quality: {features: inception}}\n"},
                                           ["train", "r.yaml", "--out", "o"],
                                           "train.quality.features inception: Inception-v3 weights not found"),
    "spec-quality-unknown-features": ({"s.yaml": QUALITY_SPEC % "resnet9000"}, ["run", "s.yaml"],
                                      "unknown features 'resnet9000'"),
    "spec-quality-no-inception-weights": ({"s.yaml": QUALITY_SPEC % "inception"}, ["run", "s.yaml"],
                                          "budget.quality.features inception: Inception-v3 weights not found"),
    "train-mnist-missing": ({"empty/keep": ""}, ["train", "--out", "o", "--dataset", "mnist", "--data-dir", "empty"],
                            "mnist: no local files"),
}


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _run_case(base: Path, name: str) -> dict:
    files, argv, _ = CASES[name]
    cwd = base / name
    cwd.mkdir()
    for rel, text in files.items():
        (cwd / rel).parent.mkdir(parents=True, exist_ok=True)
        (cwd / rel).write_text(text)
    before = _tree(cwd)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MDMSEARCH_DATA": str(cwd / "empty"),
           # no Inception weights where mdmsearch and torch look (read only; nothing is created there)
           "MDMSEARCH_CACHE": str(cwd / "no-cache"), "TORCH_HOME": str(cwd / "no-torch-home")}
    env.pop("MDMSEARCH_INCEPTION_WEIGHTS", None)
    proc = subprocess.run([sys.executable, "-m", "mdmsearch.cli", *argv], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)
    return {"rc": proc.returncode, "stderr": proc.stderr, "stdout": proc.stdout, "new": _tree(cwd) - before}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    base = tmp_path_factory.mktemp("inputs")
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {name: pool.submit(_run_case, base, name) for name in CASES}
        return {name: f.result() for name, f in futures.items()}


def test_the_table_is_large_enough():
    assert len(CASES) >= 30


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_line_exit_2_nothing_written(results, name):
    res = results[name]
    lines = res["stderr"].strip().splitlines()
    assert res["rc"] == 2, res["stderr"][-2000:]
    assert len(lines) == 1, res["stderr"][-2000:]
    assert "Traceback" not in res["stderr"]
    assert CASES[name][2] in lines[0], lines[0]
    assert lines[0].startswith("mdmsearch")
    assert not res["new"], f"created {sorted(res['new'])}"
    assert "secret" not in lines[0]  # a password in a URL is never echoed
    assert not Path("/proc/mdmsearch-studies").exists() and not Path("/nonexistent/mdm").exists()


def test_missing_data_says_where_a_spec_names_the_folder(results):
    """`run` has no --data-dir flag: the message names the spec's data.data_dir (and train's flag)."""
    line = results["data-mnist-missing"]["stderr"].strip()
    assert "set data.data_dir to their folder (mdmsearch train: --data-dir)" in line, line
    assert "data.download: true" in line, line

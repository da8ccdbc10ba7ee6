"""`mdmsearch report`: built from a leaderboard produced by a tiny real study."""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mdmsearch.compare import StructureComparison
from mdmsearch.errors import MDMError
from mdmsearch.leaderboard import read_tree
from mdmsearch.report import build_report, margin_sentence
from mdmsearch.report.build import MARKER, PNG_SIGNATURE
from mdmsearch.report.cli import add_report_command, cmd_report
from mdmsearch.report.data import BASELINES, Entry
from mdmsearch.report.render import TABLE_HEADERS
from mdmsearch.report.studies import MIN_COMPLETE_FOR_IMPORTANCE, compute_importances, load_study

SPEC = """\
study: tiny
data: {name: digits}
model: {name: unet, size: tiny}
budget: {steps: 30, eval_every: 10, eval_examples: 32, batch_size: 16, n_samples: 4, sample_steps: 5, test_n_t: 4}
sampler: {name: random, seed: 0}
pruner: {name: median, n_startup_trials: 2}
structure: {n_aux: [0, 1, 2], q_patterns: [full, chain], d_patterns: [full, aux, last]}
hyper: {process_lr: [0.01, 0.03]}
baselines: [vpsde, cld, alda, malda]
n_trials: 8
"""
GROUP = ["baseline", "n_aux", "q_pattern", "d_pattern", "d_param", "learn", "lr", "process_lr", "gamma", "beta_1",
         "time_sampler", "spec_hash"]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A real 8-trial study on digits (~10 s): studies dir, leaderboard root, rows."""
    base = tmp_path_factory.mktemp("tiny-study")
    (base / "spec.yaml").write_text(SPEC)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "mdmsearch.cli", "run", "spec.yaml", "--studies-dir", "studies"],
                          cwd=base, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    studies, root = base / "studies", base / "studies" / "leaderboard"
    return {"studies": studies, "root": root, "df": read_tree(root, "digits")}


@pytest.fixture(scope="session")
def report(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("reports")
    index = build_report(tiny["root"], "digits", out, studies_dir=tiny["studies"], top=5)
    return index


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs, self.rows, self._row, self._cell, self.tables = [], [], None, None, 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.refs.append(a.get("src"))
        elif tag in ("a", "link"):
            self.refs.append(a.get("href"))
        elif tag in ("script", "iframe"):
            self.refs.append(f"<{tag}>")  # a self-contained report has none
        elif tag == "table" and a.get("id") == "leaderboard-table":
            self.tables += 1
        elif tag == "tr" and self.tables:
            self._row = []
        elif tag == "td" and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self._row.append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            if self._row:
                self.rows.append(self._row)
            self._row = None
        elif tag == "table":
            self.tables = 0

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _parse_html(index: Path) -> _Refs:
    p = _Refs()
    p.feed(index.read_text(encoding="utf-8"))
    p.close()
    return p


def _md_table(readme: Path) -> list[dict]:
    lines = readme.read_text(encoding="utf-8").splitlines()
    head = "| " + " | ".join(TABLE_HEADERS) + " |"
    i = lines.index(head)
    rows = []
    for line in lines[i + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip()[1:-1].split(" | ")]
        assert len(cells) == len(TABLE_HEADERS), line
        rows.append(dict(zip(TABLE_HEADERS, cells)))
    return rows


def _fmt(v: float) -> str:
    return f"{v:.3f}"


def _bpd(values: pd.Series) -> str:
    v = values.astype(float)
    return _fmt(v.mean()) + (f" ± {_fmt(v.std())}" if len(v) > 1 else "")


def _key(row) -> tuple:
    return tuple(None if (isinstance(row[c], float) and math.isnan(row[c])) or row[c] is None else row[c] for c in GROUP)


# ---------------------------------------------------------------------- files, links, PNGs
def test_report_files_are_pngs_and_every_reference_exists(report):
    out = report.parent
    assert report.name == "index.html" and (out / "README.md").is_file() and (out / MARKER).is_file()
    pngs = sorted(p.name for p in out.glob("*.png"))
    for name in ("anytime.png", "learning_curves.png", "bpd_by_structure.png"):
        assert name in pngs
    assert any(n.startswith("qd_") for n in pngs)
    for name in pngs:
        data = (out / name).read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) > 100, name
    parsed = _parse_html(report)
    refs = [r for r in parsed.refs if r and not r.startswith("#")]
    assert refs, "the report references no figure"
    for ref in refs:
        assert "://" not in ref and not ref.startswith("<"), f"not self-contained: {ref}"
        assert (out / ref).is_file(), f"index.html references a missing file {ref}"
    # every PNG in the directory is shown, and the README links the same images
    assert {r for r in refs if r.endswith(".png")} == set(pngs)
    md = (out / "README.md").read_text()
    for name in pngs:
        assert f"]({name})" in md


def test_table_numbers_equal_the_parquet_data(tiny, report):
    df = tiny["df"]
    ok = df[(df["state"] == "COMPLETE") & df["val_bpd"].notna()].copy()
    rows = _md_table(report.parent / "README.md")
    html_rows = _parse_html(report).rows
    assert [list(r.values()) for r in rows] == html_rows  # HTML and README show the same table
    groups = {}
    for _, r in ok.iterrows():
        groups.setdefault(_key(r), []).append(int(r["trial"]))
    ranked = sorted(groups.values(), key=lambda ts: ok[ok["trial"].isin(ts)]["val_bpd"].mean())
    done = [r for r in rows if r["#"] != "—"]
    assert done, "no completed configuration in the table"
    for r in done:
        trials = [int(t.strip().lstrip("#")) for t in r["Runs"].split(",")]
        part = ok[ok["trial"].isin(trials)]
        assert len(part) == len(trials)
        # the runs of the row are exactly one configuration's seeds
        assert len({_key(x) for _, x in part.iterrows()}) == 1
        assert sorted(groups[_key(part.iloc[0])]) == sorted(trials)
        assert r["Val BPD"] == _bpd(part["val_bpd"])
        assert r["Test BPD"] == _bpd(part["test_bpd"])
        assert r["n"] == str(len(part))
        assert r["Steps"] == str(int(part["steps"].max()))
        assert r["Train s"] == f"{part['train_seconds'].mean():.1f}"
        assert r["K"] == str(int(part["n_aux"].iloc[0]))
        assert int(r["#"]) == 1 + ranked.index(groups[_key(part.iloc[0])])
        b = part["baseline"].iloc[0]
        if isinstance(b, str):
            assert r["Process"] == f"{b.upper()} baseline"
        else:
            assert (r["Q"], r["D"]) == (part["q_pattern"].iloc[0], part["d_pattern"].iloc[0])
    ranks = [int(r["#"]) for r in done]
    assert ranks == sorted(ranks)
    learned_groups = [ts for ts in ranked if not isinstance(ok[ok["trial"] == ts[0]]["baseline"].iloc[0], str)]
    assert sum(r["Process"] == "learned" for r in rows) == min(5, len(learned_groups))
    # the headline sentence states the margin of the best learned structure over the best baseline
    text = (report.parent / "README.md").read_text()
    base = ok[ok["baseline"].notna()].groupby(GROUP, dropna=False)["val_bpd"].mean()
    if learned_groups and len(base):
        best_l = ok[ok["trial"].isin(learned_groups[0])]["val_bpd"].mean()
        margin = base.min() - best_l
        word = "lower" if margin > 0 else "higher"
        assert f"reaches {_fmt(best_l)} validation bpd, {_fmt(abs(margin))} bpd {word} than the best baseline" in text


def test_baselines_always_listed(tiny, report, tmp_path):
    for rows in (_md_table(report.parent / "README.md"),):
        names = [r["Process"] for r in rows if r["Process"].endswith(" baseline")]
        assert sorted(names) == sorted(f"{b.upper()} baseline" for b in BASELINES)
    html_names = {r[1] for r in _parse_html(report).rows}
    for b in BASELINES:
        assert any(b.upper() in n for n in html_names)
    # top=1: one learned structure and still all four baselines
    index = build_report(tiny["root"], "digits", tmp_path / "r", studies_dir=tiny["studies"], top=1)
    rows = _md_table(index.parent / "README.md")
    assert sum(r["Process"] == "learned" for r in rows) <= 1
    assert sum(r["Process"].endswith(" baseline") for r in rows) == len(BASELINES)


def _copy_tree(src: Path, dst: Path, drop=lambda t: False, artifact_dir=None) -> None:
    for f in sorted(src.rglob("trial-*.parquet")):
        table = pq.read_table(f)
        if drop(table):
            continue
        if artifact_dir is not None and "artifact_dir" in table.column_names:
            i = table.column_names.index("artifact_dir")
            table = table.set_column(i, "artifact_dir", pa.array([artifact_dir] * len(table), pa.string()))
        target = dst / f.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, target)


def test_missing_artifacts_and_baselines_are_notes_not_crashes(tiny, tmp_path):
    root = tmp_path / "lb" / "leaderboard"
    # artifacts gone, one baseline never run, and no learning curves / Optuna study either
    _copy_tree(tiny["root"], root, drop=lambda t: t.column("baseline")[0].as_py() == "malda",
               artifact_dir=str(tmp_path / "gone"))
    index = build_report(root, "digits", tmp_path / "out", studies_dir=tmp_path / "no-studies")
    html = index.read_text()
    rows = _md_table(index.parent / "README.md")
    malda = [r for r in rows if r["Process"] == "MALDA baseline"]
    assert malda and malda[0]["Runs"] == "not run in these studies"
    assert "no samples.png" in html or "no artifact" in html
    assert "No learning curves" in html
    assert "Importances skipped" in html and "not found" in html
    assert not (index.parent / "samples_best_learned.png").exists()
    for ref in (r for r in _parse_html(index).refs if r and not r.startswith("#")):
        assert (index.parent / ref).is_file()


def test_rebuild_is_idempotent_and_leaves_no_stale_files(tiny, tmp_path):
    out = tmp_path / "reports"
    first = build_report(tiny["root"], "digits", out, studies_dir=tiny["studies"])
    files = sorted(p.name for p in first.parent.iterdir())
    (first.parent / "stale_figure.png").write_bytes(PNG_SIGNATURE)
    second = build_report(tiny["root"], "digits", out, studies_dir=tiny["studies"])
    assert second == first
    assert sorted(p.name for p in second.parent.iterdir()) == files
    assert [p.name for p in out.iterdir()] == ["digits"]  # no temporary or old directories left
    # a directory that is not a report is never overwritten
    (out / "mine").mkdir()
    (out / "mine" / "notes.txt").write_text("keep")
    mine = tmp_path / "lb2" / "leaderboard"
    _copy_tree(tiny["root"], mine)
    os.rename(mine / "dataset=digits", mine / "dataset=mine")
    with pytest.raises(MDMError, match="not an mdmsearch report"):
        build_report(mine, "mine", out, studies_dir=tiny["studies"])
    assert (out / "mine" / "notes.txt").read_text() == "keep"


def test_importances_from_the_optuna_study(tiny, tmp_path):
    info = compute_importances(load_study(tiny["studies"], "tiny"))
    assert info.study is not None and info.spec_hash == tiny["df"]["spec_hash"].iloc[0]
    # the outcome this study implies (not "importances or a note"): computed from its trials
    complete = [t for t in info.study.trials if t.state.name == "COMPLETE" and t.values]
    varying = {k for t in complete for k in t.params if len({repr(u.params.get(k)) for u in complete}) > 1}
    assert info.n_complete == len(complete)
    if len(complete) < MIN_COMPLETE_FOR_IMPORTANCE:
        assert not info.importances and "too few complete trials" in info.importance_note
    elif len(varying) < 2:
        assert not info.importances and "at least two parameters" in info.importance_note
    else:
        assert info.importance_note is None, info.importance_note
        assert info.importances and set(info.importances) <= {k for t in complete for k in t.params}
        assert math.isclose(sum(info.importances.values()), 1.0, rel_tol=1e-6)
    missing = compute_importances(load_study(tmp_path, "tiny"))
    assert missing.study is None and "not found" in missing.importance_note
    assert not (tmp_path / "tiny").exists()  # reading never creates study directories


def test_margin_sentence_better_and_worse():
    """The headline states a structure verdict with its seeds; one seed is never 'better'."""
    learned = Entry(label="K=2, Q chain, D aux", baseline=None, group="a", n=1, val_mean=2.31)
    vpsde = Entry(label="VPSDE", baseline="vpsde", group="b", n=1, val_mean=2.36)
    s = margin_sentence(learned, vpsde)
    assert s.startswith("The best learned structure (K=2, Q chain, D aux) reaches 2.310 validation bpd, "
                        "0.050 bpd lower than the best baseline (VPSDE, 2.360).")
    assert "no standard error" in s  # no per-example results to compare
    learned.vs_baseline = StructureComparison(-0.05, float("nan"), float("nan"), 1, 1, 1.0, False, 540)
    s = margin_sentence(learned, vpsde)
    assert "not decided: 1 vs 1 seeds" in s and "better" not in s
    learned.vs_baseline = StructureComparison(-0.012, 0.002, 2.0, 3, 3, 1.0, True, 540)
    assert ("Over seeds (3 vs 3 seeds, paired by seed), its held-out difference to the baseline is -0.012 "
            "[-0.021, -0.003] bpd (SE 0.002) with P(better) = 1.00: better as a structure (t test over seeds, 2 df)"
            in margin_sentence(learned, vpsde))  # (the 95% interval: t_0.975(2) SE = 0.0086)
    learned.vs_baseline = StructureComparison(-0.012, 0.004, 2.0, 3, 3, 0.67, True, 540)  # t_0.975(2) = 4.3
    assert "-0.012 [-0.029, +0.005] bpd (SE 0.004) with P(better) = 0.67: a tie within noise" in margin_sentence(learned, vpsde)
    learned.val_mean = 2.5
    assert "0.140 bpd higher than the best baseline (VPSDE, 2.360)" in margin_sentence(learned, vpsde)
    assert "no baseline has completed" in margin_sentence(learned, None)
    assert "No learned structure has completed" in margin_sentence(None, vpsde)


# ---------------------------------------------------------------------- CLI handler
def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mdmsearch")
    sub = parser.add_subparsers(dest="command", required=True)
    add_report_command(sub)
    return parser.parse_args(["report", *argv])


def test_cli_handler_builds_every_dataset(tiny, tmp_path, capsys):
    args = _args("--root", str(tiny["root"]), "--studies-dir", str(tiny["studies"]), "--out", str(tmp_path / "r"),
                 "--top", "2")
    assert (args.dataset, args.top) == (None, 2)
    assert cmd_report(args) == 0
    assert (tmp_path / "r" / "digits" / "index.html").is_file()
    assert capsys.readouterr().out.strip() == str(tmp_path / "r" / "digits" / "index.html")
    defaults = _args()
    assert (defaults.root, defaults.studies_dir, defaults.out, defaults.top) == ("studies/leaderboard", "studies",
                                                                               "reports", 5)


@pytest.mark.parametrize("case", ["missing", "empty", "other-dataset"])
def test_empty_or_missing_leaderboard_is_a_one_line_error(tiny, tmp_path, case):
    root = tmp_path / "leaderboard"
    argv = ["--root", str(root), "--out", str(tmp_path / "r")]
    if case == "empty":
        (root / "dataset=digits" / "study=x").mkdir(parents=True)
    elif case == "other-dataset":
        _copy_tree(tiny["root"], root)
        argv += ["--dataset", "cifar10"]
    with pytest.raises(MDMError) as err:
        cmd_report(_args(*argv))
    msg = str(err.value)
    assert "\n" not in msg and str(root) in msg
    assert {"missing": "no leaderboard", "empty": "empty", "other-dataset": "datasets with results: digits"}[case] in msg
    assert not (tmp_path / "r" / "digits").exists() and not (tmp_path / "r" / "cifar10").exists()


# ---------------------------------------------------------------------- rendering
@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(report, tmp_path):
    shot = tmp_path / "shot.png"
    cmd = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1280,2000",
           report.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert shot.is_file() and shot.read_bytes()[:8] == PNG_SIGNATURE
    assert shot.stat().st_size > 20_000, "screenshot is (nearly) blank"
    from PIL import Image

    with Image.open(shot) as im:
        assert im.size == (1280, 2000)
        colors = im.convert("RGB").resize((320, 500)).getcolors(maxcolors=1 << 16)
        assert colors is None or len(colors) > 50, "screenshot is (nearly) uniform"


def test_report_without_any_completed_trial(tiny, tmp_path):
    root = tmp_path / "leaderboard"
    _copy_tree(tiny["root"], root, drop=lambda t: t.column("state")[0].as_py() == "COMPLETE")
    index = build_report(root, "digits", tmp_path / "out", studies_dir=tiny["studies"])
    rows = _md_table(index.parent / "README.md")
    assert sorted(r["Process"] for r in rows) == sorted(f"{b.upper()} baseline" for b in BASELINES)
    assert all(r["Val BPD"] == "—" and r["#"] == "—" for r in rows)
    text = index.read_text()
    assert "No trial has completed yet" in text and "No configuration has completed yet" in text
    for ref in (r for r in _parse_html(index).refs if r and not r.startswith("#")):
        assert (index.parent / ref).is_file()


def test_importances_follow_the_objective_and_say_why_when_skipped():
    """On a synthetic study whose value depends on x only, x gets (nearly) all the importance;
    too few complete trials give a note and no importances."""
    import optuna

    from mdmsearch.report.studies import StudyInfo

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: t.suggest_float("x", -1, 1) ** 2 + 0 * t.suggest_float("y", -1, 1), n_trials=30)
    info = compute_importances(StudyInfo(name="synthetic", study=study))
    assert info.importance_note is None and set(info.importances) == {"x", "y"}
    assert info.importances["x"] > 0.9
    small = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    small.optimize(lambda t: t.suggest_float("x", -1, 1) + t.suggest_float("y", -1, 1),
                   n_trials=MIN_COMPLETE_FOR_IMPORTANCE - 1)
    few = compute_importances(StudyInfo(name="small", study=small))
    assert not few.importances and "too few complete trials" in few.importance_note

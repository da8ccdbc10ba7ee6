#!/usr/bin/env python
"""Mutation check of the test suite: does the suite fail when the product breaks?

Run by hand (not in CI), from the repository root:

    python tools/mutation_check.py                 # every mutation, table to reports/mutation_check.md
    python tools/mutation_check.py --only ldj      # mutations whose name contains "ldj"
    python tools/mutation_check.py --list          # what would be applied, and where

Each mutation is (file, exact old snippet, new snippet, tests).  For each one the working tree
(tracked and untracked, non-ignored files) is copied to a temporary directory, the snippet is
replaced there (it must occur exactly once: if the code moved, the mutation is reported as
"mutation not applicable (snippet not found)" and the script exits non-zero rather than
passing silently), and only the listed tests run there with ``python -m pytest``, with the copy
as the working directory and on PYTHONPATH (so that the copy, not an installed mdmsearch, is
imported, in subprocesses too).  An unmutated copy runs the same tests first: they must pass.

Result per mutation: CAUGHT (a test failed: named in the table), MISSED (all passed),
ERROR (pytest could not run the tests, e.g. a collection error), NOT APPLICABLE.
Exit status 0 only if every mutation was caught.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Mutation:
    name: str
    what: str
    file: str
    old: str
    new: str
    tests: list[str]  # pytest arguments: files, node ids, or "-k" expressions


MUTATIONS = [
    # -------------------------------------------------------------- the bugs of issue 14
    Mutation(
        "truncation-logdet-dropped", "drop d B(t_min) tr(A) from the truncation term",
        "mdmsearch/objectives/elbo.py",
        "    return logdet_phi + 0.5 * (sum_except_batch(eps.pow(2)) - sum_except_batch(resid.pow(2))).to(_DT)",
        "    return 0.5 * (sum_except_batch(eps.pow(2)) - sum_except_batch(resid.pow(2))).to(_DT)",
        ["tests/test_oracles.py", "tests/test_elbo.py"],
    ),
    Mutation(
        "truncation-half-dropped", "drop the 1/2 of the quadratic part of the truncation term",
        "mdmsearch/objectives/elbo.py",
        "    return logdet_phi + 0.5 * (sum_except_batch(eps.pow(2)) - sum_except_batch(resid.pow(2))).to(_DT)",
        "    return logdet_phi + (sum_except_batch(eps.pow(2)) - sum_except_batch(resid.pow(2))).to(_DT)",
        ["tests/test_oracles.py", "tests/test_elbo.py"],
    ),
    Mutation(
        "prior-kl-halved", "halve the prior KL",
        "mdmsearch/diffusion/process.py",
        "        return (0.5 * (d * per_coord + coef * xsq)).to(x.dtype)",
        "        return (0.25 * (d * per_coord + coef * xsq)).to(x.dtype)",
        ["tests/test_oracles.py", "tests/test_process.py"],
    ),
    Mutation(
        "prior-kl-logdet-dropped", "drop log det Sigma_T from the prior KL",
        "mdmsearch/diffusion/process.py",
        "torch.log(self.s_inf).sum() - logdet_sig",
        "torch.log(self.s_inf).sum()",
        ["tests/test_oracles.py", "tests/test_process.py"],
    ),
    Mutation(
        "evaluate-ldj-dropped", "drop the dequantization/logit log-Jacobian in evaluate_bpd",
        "mdmsearch/training/evaluate.py",
        "        bpds.append(bits_per_dim(terms.total, ldj, dim, levels).cpu())",
        "        bpds.append(bits_per_dim(terms.total, torch.zeros_like(ldj), dim, levels).cpu())",
        ["tests/test_oracles.py", "tests/test_elbo.py"],
    ),
    Mutation(
        "digits-levels-256-evaluate", "dequantize with 256 levels in evaluate_bpd (digits has 17)",
        "mdmsearch/training/evaluate.py",
        "        x, ldj = prepare_batch(batch, levels, deq_gen)",
        "        x, ldj = prepare_batch(batch, 256, deq_gen)",
        ["tests/test_oracles.py"],
    ),
    Mutation(
        "digits-levels-256-trainer", "the trainer evaluates with 256 levels (digits has 17)",
        "mdmsearch/training/trainer.py",
        "            res = evaluate_bpd(self.process, self.model, data, self.data.levels,",
        "            res = evaluate_bpd(self.process, self.model, data, 256,",
        ["tests/test_oracles.py"],
    ),
    Mutation(
        "digits-levels-256-data", "the digits bundle says 256 levels",
        "mdmsearch/data/images.py",
        '    return DataBundle("digits", (1, 8, 8), 17, train, val, test, meta={"source": "sklearn"})',
        '    return DataBundle("digits", (1, 8, 8), 256, train, val, test, meta={"source": "sklearn"})',
        ["tests/test_oracles.py", "tests/test_data.py"],
    ),
    Mutation(
        "q-gradient-sign-flipped", "Q has the right value but the opposite gradient",
        "mdmsearch/diffusion/params.py",
        "        u = self.u * self.mask  # [n, n], masked entries exactly 0 and without gradient\n"
        "        return u - u.T\n",
        "        u = self.u * self.mask  # [n, n], masked entries exactly 0 and without gradient\n"
        "        q = u - u.T\n"
        "        return 2 * q.detach() - q\n",
        ["tests/test_process.py"],
    ),
    Mutation(
        "duplicate-counted-as-trained", "the ranked leaderboard counts DUPLICATE rows as training runs",
        "mdmsearch/leaderboard.py",
        '    ok = df[(df["state"] == "COMPLETE") & df[metric].notna()].copy()',
        '    ok = df[df["state"].isin(["COMPLETE", "DUPLICATE"]) & df[metric].notna()].copy()',
        ["tests/test_search.py", "-k", "duplicates"],
    ),
    Mutation(
        "duplicate-retrained", "a repeated configuration is trained again instead of answered",
        "mdmsearch/search/runner.py",
        "        if (t.number != own_number and t.user_attrs.get(\"config_hash\") == config_hash",
        "        if (False and t.number != own_number and t.user_attrs.get(\"config_hash\") == config_hash",
        ["tests/test_search.py", "-k", "duplicates"],
    ),
    Mutation(
        "heartbeat-skipped", "a running trial does not keep its heartbeat",
        "mdmsearch/search/runner.py",
        "        with Heartbeat(art_dir, number):\n",
        "        if True:  # no heartbeat\n",
        ["tests/test_search.py", "-k", "heartbeat"],
    ),
    Mutation(
        "heartbeat-not-refreshed", "the heartbeat thread never beats again after the first beat",
        "mdmsearch/search/study.py",
        "            try:\n                self.beat()\n",
        "            try:\n                pass\n",
        ["tests/test_search.py", "-k", "heartbeat"],
    ),
    Mutation(
        "pending-ray-claim-not-held", "the Ray driver does not beat for a claimed trial waiting to start",
        "mdmsearch/search/ray_executor.py",
        "        HELD.hold(artifact_dir(self.spec, trial), trial.number)",
        "        pass  #",
        ["tests/test_ray.py", "-k", "waiting_for_resources"],
    ),
    # -------------------------------------------------------------- more of the same kind
    Mutation(
        "div-drift-sign-flipped", "the divergence of the drift enters the integrand with the wrong sign",
        "mdmsearch/objectives/elbo.py",
        "    integrand = -0.5 * dsm + 0.5 * d * tr_m_sigma_inv + process.div_drift(kern.t, d)",
        "    integrand = -0.5 * dsm + 0.5 * d * tr_m_sigma_inv - process.div_drift(kern.t, d)",
        ["tests/test_oracles.py"],
    ),
    Mutation(
        "logit-ldj-constant-dropped", "the logit transform's log-Jacobian forgets log(1 - 2 alpha)",
        "mdmsearch/objectives/bpd.py",
        "    ldj = sum_except_batch(math.log(1 - 2 * alpha) - torch.log(p) - torch.log1p(-p))",
        "    ldj = sum_except_batch(-torch.log(p) - torch.log1p(-p))",
        ["tests/test_oracles.py", "tests/test_elbo.py"],
    ),
    Mutation(
        "resume-history-not-replayed", "a resumed trial does not replay its learning curve to the pruner",
        "mdmsearch/training/trainer.py",  # (Trainer.run(replay=True), which the search's executors call)
        "                    self.callback(int(row[\"step\"]), dict(row))",
        "                    pass",
        ["tests/test_training.py", "-k", "run_result"],
    ),
    # -------------------------------------------------------------- the Gaussian residual (issue 11)
    Mutation(
        "residual-rb-variance-term-dropped", "drop s2^2 a from the closed-form E|R(eps_G - eps)|^2",
        "mdmsearch/objectives/residual.py",
        "    num = (x.to(_DT) - stats.mean).pow(2) + stats.var.pow(2) * a_c  # [B, *shape]",
        "    num = (x.to(_DT) - stats.mean).pow(2)  # [B, *shape]",
        ["tests/test_residual.py"],
    ),
    Mutation(
        "residual-error-sign", "flip the sign of the noise part of eps_G - eps",
        "mdmsearch/objectives/residual.py",
        "    scalar = ((x - stats.mean.to(x.dtype)) - stats.var.to(x.dtype) * q_eps) / denom  # [B, *shape]",
        "    scalar = ((x - stats.mean.to(x.dtype)) + stats.var.to(x.dtype) * q_eps) / denom  # [B, *shape]",
        ["tests/test_residual.py"],
    ),
    Mutation(
        "residual-stats-not-restored", "a resumed run recomputes its Gaussian statistics instead of loading them",
        "mdmsearch/training/trainer.py",
        '            self.residual.load_state_dict(state["residual_stats"])  # the statistics trained with, not recomputed',
        "            pass",
        ["tests/test_residual.py"],
    ),
]


def copy_tree(dst: Path) -> None:
    """The working tree as it is (tracked + untracked, non-ignored files), without .git."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if not src.is_file():  # deleted but still tracked
            continue
        out = dst / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, out)


def apply(copy: Path, m: Mutation) -> None:
    path = copy / m.file
    if not path.is_file():
        raise LookupError(f"mutation not applicable (file {m.file} not found)")
    text = path.read_text()
    count = text.count(m.old)
    if count != 1:
        what = "snippet not found" if count == 0 else f"snippet found {count} times"
        raise LookupError(f"mutation not applicable ({what}) in {m.file}")
    text = text.replace(m.old, m.new)
    compile(text, str(path), "exec")  # a mutation must still be valid Python
    path.write_text(text)


def run_tests(copy: Path, tests: list[str], timeout: float) -> tuple[int, str, float]:
    env = {**os.environ, "PYTHONPATH": str(copy), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg",
           "RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": os.environ.get("RAY_TMPDIR", "/tmp/ray-mutation")}
    # one process (-n 0): under pytest-xdist a -x stop exits 2 ("interrupted"), not 1 (failed)
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-rf", "-n", "0", "-p", "no:cacheprovider", *tests]
    t0 = time.perf_counter()
    try:
        res = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
        return res.returncode, res.stdout + res.stderr, time.perf_counter() - t0
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return -1, out + "\n(timed out)", time.perf_counter() - t0


def failed_tests(output: str) -> list[str]:
    return sorted(set(re.findall(r"^FAILED (\S+)", output, flags=re.M)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=None, help="run mutations whose name contains this")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--out", default=str(ROOT / "reports" / "mutation_check.md"), help="Markdown table")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per test run")
    ap.add_argument("--skip-baseline", action="store_true", help="do not run the unmutated tests first")
    ap.add_argument("--keep", action="store_true", help="keep the temporary copies")
    args = ap.parse_args(argv)

    muts = [m for m in MUTATIONS if args.only is None or args.only in m.name]
    if not muts:
        print(f"no mutation matches {args.only!r}", file=sys.stderr)
        return 2
    if args.list:
        for m in muts:
            print(f"{m.name:32s} {m.file:36s} {' '.join(m.tests)}\n    {m.what}")
        return 0

    tmp_root = Path(tempfile.mkdtemp(prefix="mdm-mutation-"))
    rows, bad = [], 0
    try:
        if not args.skip_baseline:
            base = tmp_root / "baseline"
            copy_tree(base)
            suites = []
            for m in muts:
                if m.tests not in suites:
                    suites.append(m.tests)
            for tests in suites:
                rc, out, secs = run_tests(base, tests, args.timeout)
                print(f"baseline {' '.join(tests)}: rc={rc} ({secs:.0f}s)", flush=True)
                if rc != 0:
                    print(out[-4000:], file=sys.stderr)
                    print("the unmutated tests fail: fix them before checking mutations", file=sys.stderr)
                    return 2
        for i, m in enumerate(muts):
            copy = tmp_root / f"m{i:02d}-{m.name}"
            copy_tree(copy)
            try:
                apply(copy, m)
            except LookupError as exc:
                rows.append((m, "NOT APPLICABLE", str(exc), 0.0))
                print(f"{m.name}: {exc}", file=sys.stderr, flush=True)
                bad += 1
                continue
            rc, out, secs = run_tests(copy, m.tests, args.timeout)
            if rc == 1:
                result, by = "CAUGHT", ", ".join(failed_tests(out)) or "(see output)"
            elif rc == 0:
                result, by = "MISSED", ""
                bad += 1
            else:
                result, by = "ERROR", f"pytest exit status {rc}: " + " ".join(out.strip().splitlines()[-1:])
                bad += 1
            rows.append((m, result, by, secs))
            print(f"{m.name}: {result} {by} ({secs:.0f}s)", flush=True)
            if not args.keep:
                shutil.rmtree(copy, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(tmp_root, ignore_errors=True)

    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    lines = [
        "# Mutation check of the test suite",
        "",
        f"`python tools/mutation_check.py` at {head}{' (with uncommitted changes)' if dirty else ''}, "
        f"{time.strftime('%Y-%m-%d %H:%M')}: {sum(r[1] == 'CAUGHT' for r in rows)} of {len(rows)} caught.",
        "",
        "| mutation | what | file | result | caught by | tests run | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for m, result, by, secs in rows:
        lines.append(f"| {m.name} | {m.what} | `{m.file}` | **{result}** | {by.replace('|', '/')} | "
                     f"`{' '.join(m.tests)}` | {secs:.0f} |")
    table = "\n".join(lines) + "\n"
    print("\n" + table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    print(f"written to {out}")
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

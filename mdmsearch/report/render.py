"""The report model (sections of figures and notes) and its two renderings: a self-contained
``index.html`` (inline CSS, images beside it, no scripts, nothing fetched) and a GitHub
``README.md`` (Markdown table + image links)."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from .data import SECONDS_DECIMALS, Entry, Table, fmt_bpd, fmt_comparison, fmt_hyper, fmt_num

RANKING_RULE = ("Ranked as `mdmsearch leaderboard` ranks: a confirmed winner first, then the other configurations "
                "its confirmation raced, both over their fresh seeds only (Seeds: fresh), then every other "
                "configuration over the search's seeds (Seeds: search); within each, by mean validation BPD "
                "(mean ± std, n seeds; lower is better). # is the rank among all {n} completed configurations; "
                "the fixed baselines are always listed. vs baseline: fresh seeds on the test split, search seeds "
                "on all held-out examples.")
TABLE_HEADERS = ("#", "Process", "K", "K eff", "Q", "D", "Hyperparameters", "Val BPD", "Test BPD", "vs baseline", "n",
                 "Seeds", "Steps", "Train s", "Runs", "Config")


@dataclass
class Figure:
    file: str  # a PNG beside index.html
    caption: str
    alt: str = ""
    css: str = ""  # extra class on the <figure> (the Q/D grid sizes figures by matrix size)


@dataclass
class Section:
    id: str
    title: str
    intro: str = ""
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    layout: str = "stack"  # stack | qdgrid | pair


@dataclass
class Report:
    dataset: str
    generated_at: str
    summary: str
    table: Table
    multi_study: bool
    sections: list[Section]
    provenance: dict
    table_notes: list[str] = field(default_factory=list)

    def files(self) -> list[str]:
        return [f.file for s in self.sections for f in s.figures]


# ---------------------------------------------------------------------- table cells
def runs_cell(e: Entry, multi_study: bool) -> str:
    if not e.complete:
        return e.status
    if multi_study:
        by: dict[str, list[int]] = {}
        for s, t in e.trials:
            by.setdefault(s, []).append(t)
        return "; ".join(f"{s} " + ", ".join(f"#{t}" for t in sorted(ts)) for s, ts in sorted(by.items()))
    return ", ".join(f"#{t}" for _, t in sorted(e.trials, key=lambda st: st[1]))


def table_cells(e: Entry, multi_study: bool) -> list[str]:
    """The displayed text of each column (shared by HTML and Markdown, parsed back by the tests)."""
    if e.baseline:
        process, q, d = f"{e.baseline.upper()} baseline", "fixed", "fixed"
    else:
        process, q, d = "learned", e.q_pattern or "—", e.d_pattern or "—"
        rep = e.rep or {}
        dp = rep.get("d_param")
        if isinstance(dp, str) and dp not in ("full", "fixed"):
            d += f" ({dp})"
    k = str(e.n_aux) if e.n_aux is not None else "—"
    k_eff = str(e.eff_n_aux) if e.eff_n_aux is not None else "—"  # what training made of K (docs/math.md sec. 9)
    if not e.complete:
        return ["—", process, k, "—", q, d, "—", "—", "—", "—", "0", "—", "—", "—", runs_cell(e, multi_study), "—"]
    return [str(e.rank), process, k, k_eff, q, d, fmt_hyper(e.hyper), fmt_bpd(e.val_mean, e.val_std),
            fmt_bpd(e.test_mean, e.test_std), fmt_comparison(e.vs_baseline), str(e.n), "fresh" if e.fresh else "search",
            str(e.steps) if e.steps is not None else "—",
            fmt_num(e.train_seconds, SECONDS_DECIMALS), runs_cell(e, multi_study), e.config]


# ---------------------------------------------------------------------- HTML
CSS = """
*{box-sizing:border-box}
body{margin:0;background:#eef0f3;color:#1d2330;font:15px/1.5 -apple-system,BlinkMacSystemFont,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:1240px;margin:0 auto;background:#fff;padding:28px 40px 48px;box-shadow:0 0 12px rgba(0,0,0,.06)}
h1{font-size:26px;margin:0 0 4px}
h2{font-size:19px;margin:34px 0 8px;padding-bottom:4px;border-bottom:2px solid #e3e6ea}
.meta{color:#5b6472;font-size:13px;margin:0 0 12px}
.summary{font-size:15px;margin:6px 0}
.headline{font-size:16px;background:#eef6ff;border-left:4px solid #1f77b4;padding:9px 14px;margin:12px 0 4px}
nav{font-size:13px;margin:10px 0 0;display:flex;flex-wrap:wrap;gap:4px 14px}
nav a{color:#1f5f9f;text-decoration:none}nav a:hover{text-decoration:underline}
.intro{color:#39414d;margin:4px 0 10px;font-size:14px}
.tablewrap{overflow-x:auto}
table.lb{border-collapse:collapse;font-size:13px;width:100%;margin-top:8px}
table.lb th{background:#f3f5f8;text-align:left;font-weight:600;padding:6px 8px;border-bottom:2px solid #d5d9df;white-space:nowrap}
table.lb td{padding:5px 8px;border-bottom:1px solid #e8eaee;vertical-align:top}
table.lb td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
table.lb td.mono,code{font-family:SFMono-Regular,Menlo,Consolas,monospace;font-size:12px;color:#4a5260}
table.lb tr.baseline td{background:#fff9e8}
table.lb tr.best td{font-weight:600}
table.lb tr.missing td{color:#7a828e}
.badge{display:inline-block;font-size:11px;font-weight:600;padding:0 6px;border-radius:8px;background:#f0b400;color:#fff;margin-left:4px}
.badge.learned{background:#1f77b4}
figure{margin:10px 0 18px}
figure img{max-width:100%;height:auto;border:1px solid #eceef1;border-radius:4px;display:block}
figcaption{font-size:13px;color:#4b5563;margin-top:4px}
.qdgrid{display:grid;grid-template-columns:repeat(6,1fr);gap:8px 20px;align-items:start}
.qdgrid figure{grid-column:span 6}.qdgrid figure.n1{grid-column:span 2}.qdgrid figure.n2{grid-column:span 3}
.qdgrid figure img{margin:0 auto}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:22px;align-items:start}
.pair img{image-rendering:pixelated;width:100%;max-width:420px}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:6px 12px;font-size:13px;margin:6px 0}
table.prov{border-collapse:collapse;font-size:13px}
table.prov td,table.prov th{padding:4px 10px;border-bottom:1px solid #e8eaee;text-align:left;vertical-align:top}
footer{margin-top:36px;font-size:12px;color:#7a828e}
"""


def _e(s: object) -> str:
    return html.escape(str(s), quote=True)


def _html_table(report: Report) -> str:
    t = report.table
    best_group = t.best_learned.group if t.best_learned else None
    out = ['<div class="tablewrap"><table class="lb" id="leaderboard-table"><thead><tr>']
    out += [f"<th>{_e(h)}</th>" for h in TABLE_HEADERS]
    out.append("</tr></thead><tbody>")
    numeric = {"#", "K", "K eff", "Val BPD", "Test BPD", "n", "Steps", "Train s"}
    for e in t.rows:
        cls = []
        if e.baseline:
            cls.append("baseline")
        if not e.complete:
            cls.append("missing")
        if e.group and e.group == best_group:
            cls.append("best")
        cells = table_cells(e, report.multi_study)
        out.append(f'<tr class="{" ".join(cls)}" data-config="{_e(e.group or "")}">')
        for h, c in zip(TABLE_HEADERS, cells):
            klass = "num" if h in numeric else ("mono" if h == "Config" else "")
            if h == "Process":
                badge = "baseline" if e.baseline else "learned"
                name = e.baseline.upper() if e.baseline else "learned"
                inner = (f'{_e(name)} <span class="badge">baseline</span>' if e.baseline
                         else f'<span class="badge {badge}">learned</span>')
                out.append(f"<td>{inner}</td>")
                continue
            out.append(f'<td class="{klass}">{_e(c)}</td>' if klass else f"<td>{_e(c)}</td>")
        out.append("</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def _html_figures(sec: Section) -> str:
    out = []
    if sec.figures:
        wrap = {"qdgrid": "qdgrid", "pair": "pair"}.get(sec.layout)
        if wrap:
            out.append(f'<div class="{wrap}">')
        for f in sec.figures:
            cls = f' class="{_e(f.css)}"' if f.css else ""
            out.append(f'<figure{cls}><a href="{_e(f.file)}"><img src="{_e(f.file)}" alt="{_e(f.alt or f.caption)}">'
                       f"</a><figcaption>{_e(f.caption)}</figcaption></figure>")
        if wrap:
            out.append("</div>")
    for n in sec.notes:
        out.append(f'<p class="note">{_e(n)}</p>')
    return "\n".join(out)


def _prov_rows(report: Report) -> list[tuple[str, str]]:
    p = report.provenance
    rows = []
    for s in p["studies"]:
        states = ", ".join(f"{v} {k.lower()}" for k, v in s["states"].items())
        hashes = ", ".join(s["spec_hashes"]) or "—"
        extra = []
        if s.get("study_spec_hash") and s["study_spec_hash"] not in s["spec_hashes"]:
            extra.append(f"study's current spec hash {s['study_spec_hash']} (the spec changed since some rows)")
        if s.get("created_at"):
            extra.append(f"created {s['created_at']}")
        if s.get("first_started"):
            extra.append(f"trials {s['first_started']} – {s.get('last_finished') or '?'}")
        if s.get("storage_note"):
            extra.append(s["storage_note"])
        elif s.get("storage"):
            extra.append(f"storage {s['storage']}")
        rows.append((f"study {s['study']}", f"{s['rows']} rows ({states}); spec hash {hashes}"
                     + ("; " + "; ".join(extra) if extra else "")))
    for name, vs in p["versions"].items():
        rows.append((name, ", ".join(vs) or "—"))
    rows.append(("leaderboard", p.get("root", "")))
    rows.append(("learning curves", p.get("curves_root", "")))
    rows.append(("studies dir", p.get("studies_dir", "")))
    rows.append(("generated", f"{report.generated_at} by mdmsearch {p.get('generator', '')}"))
    return rows


def render_html(report: Report) -> str:
    nav = [("leaderboard", "Leaderboard")] + [(s.id, s.title) for s in report.sections] + [("provenance", "Provenance")]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>mdmsearch report: {_e(report.dataset)}</title>",
        f"<style>{CSS}</style></head><body><main>",
        f"<h1>Structure search report: {_e(report.dataset)}</h1>",
        f'<p class="meta">generated {_e(report.generated_at)} from the Parquet leaderboard</p>',
        f'<p class="summary">{_e(report.summary)}</p>',
        *[f'<p class="headline">{_e(h)}</p>' for h in report.table.headlines],
        f'<p class="headline">{_e(report.table.sentence)}</p>',
        "<nav>" + "".join(f'<a href="#{_e(i)}">{_e(t)}</a>' for i, t in nav) + "</nav>",
        '<section id="leaderboard"><h2>Leaderboard</h2>',
        f'<p class="intro">{_e(RANKING_RULE.format(n=len(report.table.all_entries)))} '
        "<em>vs baseline</em> compares structures: "
        "the held-out BPD difference to the reference baseline over training seeds, ± its standard error including the "
        "seed-to-seed spread, and the verdict of a t test over seeds (better or worse at the 5% level, else a tie "
        "within noise; with one seed on either side, not decided), the seeds behind it and P, the share of seeds "
        "in which the configuration beats the baseline; distinct training seeds are the only replicates "
        "(docs/comparisons.md). <em>Train s</em> is the mean training time per "
        "run; <em>Runs</em> lists the trials averaged; <em>Config</em> identifies the configuration up to the "
        "seed.</p>",
        _html_table(report),
    ]
    parts += [f'<p class="note">{_e(n)}</p>' for n in report.table_notes]
    parts.append("</section>")
    for sec in report.sections:
        parts.append(f'<section id="{_e(sec.id)}"><h2>{_e(sec.title)}</h2>')
        if sec.intro:
            parts.append(f'<p class="intro">{_e(sec.intro)}</p>')
        parts.append(_html_figures(sec))
        parts.append("</section>")
    parts.append('<section id="provenance"><h2>Provenance</h2><table class="prov"><tbody>')
    parts += [f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in _prov_rows(report)]
    parts.append("</tbody></table></section>")
    parts.append('<footer>Regenerate with <code>mdmsearch report --dataset '
                 f'{_e(report.dataset)}</code>; the directory is rebuilt from scratch each time.</footer>')
    parts.append("</main></body></html>")
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------------- Markdown
def _md(s: object) -> str:
    return str(s).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def render_markdown(report: Report) -> str:
    t = report.table
    lines = [f"# Structure search report: {report.dataset}", "",
             f"_Generated {report.generated_at} from the Parquet leaderboard; "
             "open [index.html](index.html) for the full report._", "",
             report.summary, "", *[f"**{h}**\n" for h in t.headlines], f"**{t.sentence}**", "",
             "## Leaderboard", "", RANKING_RULE.format(n=len(t.all_entries)), "",
             "| " + " | ".join(TABLE_HEADERS) + " |",
             "|" + "|".join("---:" if h in ("#", "K", "K eff", "Val BPD", "Test BPD", "n", "Steps", "Train s") else "---"
                            for h in TABLE_HEADERS) + "|"]
    for e in t.rows:
        cells = table_cells(e, report.multi_study)
        lines.append("| " + " | ".join(_md(c) for c in cells) + " |")
    lines.append("")
    lines += [f"> **Note:** {_md(n)}" + "\n" for n in report.table_notes]
    for sec in report.sections:
        lines += [f"## {sec.title}", ""]
        if sec.intro:
            lines += [sec.intro, ""]
        if sec.layout == "pair" and len(sec.figures) == 2:
            a, b = sec.figures
            lines += [f"| {_md(a.caption)} | {_md(b.caption)} |", "|---|---|",
                      f"| ![{_md(a.alt or a.caption)}]({a.file}) | ![{_md(b.alt or b.caption)}]({b.file}) |", ""]
        else:
            for f in sec.figures:
                lines += [f"![{_md(f.alt or f.caption)}]({f.file})", "", f"_{f.caption}_", ""]
        for n in sec.notes:
            lines += [f"> **Note:** {n}", ""]
    lines += ["## Provenance", ""]
    lines += [f"- **{k}**: {v}" for k, v in _prov_rows(report)]
    lines.append("")
    return "\n".join(lines)

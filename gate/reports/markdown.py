"""summary.md: a short Markdown summary for $GITHUB_STEP_SUMMARY and PR comments."""

from __future__ import annotations

from gate.reports.view import MARKS, ReportView

MARKER = "<!-- gate-report -->"  # a PR comment carrying it is updated in place, not duplicated
MAX_BYTES = 60_000  # GitHub allows 65,536 characters in a comment and 1 MiB per step summary
EMOJI = {"pass": "✅", "fail": "❌", "inconclusive": "⚠️", "skipped": "⏭️", "error": "💥", "": ""}


def render_markdown(view: ReportView, report_name: str = "report.html") -> str:
    verdict = view.verdict
    head = [MARKER]
    if verdict.selected:
        head.append(f"## gate: ✅ {_code(_escape(verdict.selected))} may ship")
    else:
        head.append("## gate: ❌ no checkpoint may ship")
    head += ["", _escape(verdict.reason), ""]
    head += [f"> {_escape(note)}" for note in view.notes]
    drift_titles = [f"{_escape(s)} {m}" for s in view.drift_suites for m in ("kl", "top1")]
    titles = [_escape(c.title) for c in view.columns] + drift_titles
    table = ["| checkpoint | step | verdict | " + " | ".join(titles) + " |"]
    table.append("| --- | --- | --- | " + " | ".join("---" for _ in titles) + " |")
    for row in view.rows:
        name = f"**{_code(_escape(row.name))}** ★" if row.selected else _code(_escape(row.name))
        cells = [f"{EMOJI[c.outcome]} {_escape(c.value)}" for c in row.cells]
        for suite in view.drift_suites:
            kl, top1 = row.drift.get(suite, (None, None))
            cells += ["—", "—"] if kl is None else [f"{kl:.4g}", f"{top1:.1%}"]
        verdict_cell = f"{EMOJI.get(row.verdict, '')} {MARKS.get(row.verdict, ('', row.verdict))[1]}"
        table.append(f"| {name} | {row.step if row.step is not None else '—'} | {verdict_cell} | " + " | ".join(cells) + " |")
    tail = ["", "Policy: " + "; ".join(f"`{g}`" for g in verdict.policy.get("gates", [])), ""]
    if view.sizing:
        tail += [
            "Suite sizes (80% power at the family's level): "
            + "; ".join(
                f"{_escape(s.title)}: MDE {s.mde}, {s.needed if s.needed is not None else '—'} items needed ({s.items} scored)"
                for s in view.sizing
            ),
            "",
        ]
    if view.overlaps:
        tail += ["Contamination check: " + "; ".join(("✅ " if o.clean else "❌ ") + _escape(o.summary()) for o in view.overlaps), ""]
    flips = _flipped_probes(view)
    tail += flips
    tail.append(f"Full report with plots and per-document drill-down: `{report_name}` (in the run's output folder or CI artifact).")
    body = "\n".join(head + table + tail) + "\n"
    if len(body.encode()) > MAX_BYTES and flips:
        tail = [line for line in tail if line not in flips]  # the full report lists them
        body = "\n".join(head + table + tail) + "\n"
    while len(body.encode()) > MAX_BYTES and len(table) > 3:
        table.pop()  # keep the summary under GitHub's limits: drop rows from the end
        body = "\n".join(head + table + ["", f"_… table cut to {len(table) - 2} rows; see the full report._"] + tail) + "\n"
    return body


MAX_FLIPS = 20  # rows in all: the selected candidate's first


def _flipped_probes(view: ReportView) -> list[str]:
    """A collapsed section listing the generation items whose checks flipped, per checkpoint."""
    lines = []
    downs = sorted(view.drilldowns, key=lambda d: d.name != view.verdict.selected)
    flipped = [(d, sbs, p) for d in downs for sbs in d.outputs for p in sbs.lost + sbs.gained]
    for down, sbs, p in flipped[:MAX_FLIPS]:
        sign = "❌ lost" if p.outcome == "lost" else "✅ gained"
        lines.append(
            f"| {_escape(sbs.suite)} | {_code(_escape(down.name))} | {_code(_escape(p.id))} | {sign} | {_escape(_short(p.base))} | {_escape(_short(p.checkpoint))} |"
        )
    if len(flipped) > MAX_FLIPS:
        lines.append(f"| … | | | {len(flipped) - MAX_FLIPS} more in the full report | | |")
    if not lines:
        return []
    count = len(flipped)
    return [
        "<details><summary>Flipped probes: " + str(count) + " output(s) whose checks changed outcome</summary>",
        "",
        "| suite | checkpoint | probe | outcome | base said | checkpoint says |",
        "| --- | --- | --- | --- | --- | --- |",
        *lines,
        "",
        "</details>",
        "",
    ]


def _short(text: str, limit: int = 120) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _escape(text: str) -> str:
    """Text safe in a table cell of GitHub Markdown, which renders inline HTML: no tags, no pipes."""
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|").replace("\n", " ")


def _code(text: str) -> str:
    """A code span that a name containing backticks cannot break out of."""
    fence = "``" if "`" in text else "`"
    return f"{fence} {text} {fence}" if fence == "``" else f"`{text}`"

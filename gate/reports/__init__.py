"""Reports people read and machines parse, from results.json + verdict.json alone (no GPU, no torch).

``write_reports`` writes OUT/report.html (one self-contained file), OUT/summary.md (for
$GITHUB_STEP_SUMMARY and PR comments) and OUT/junit.xml (one test case per checkpoint x check).
"""

from __future__ import annotations

import os
from pathlib import Path

from gate.errors import RunFailure
from gate.reports.html import render_html
from gate.reports.junit import render_junit
from gate.reports.markdown import MARKER, render_markdown
from gate.reports.view import ReportView, build_view
from gate.results import Results
from gate.verdict import Verdict

__all__ = ["MARKER", "ReportView", "build_view", "render_html", "render_junit", "render_markdown", "write_reports"]


REPORT_FILES = {"html": "report.html", "markdown": "summary.md", "junit": "junit.xml"}
"""The reports, by kind: their file names in the output folder."""


def write_reports(results: Results, verdict: Verdict, out_dir: str | Path) -> dict[str, Path]:
    """Render every report into ``out_dir``; returns their paths by kind."""
    out_dir = Path(out_dir)
    view = build_view(results, verdict)
    paths = {kind: out_dir / name for kind, name in REPORT_FILES.items()}
    for kind, text in (("html", render_html(view)), ("markdown", render_markdown(view)), ("junit", render_junit(view))):
        # One temporary name per process: two runs finishing on one folder must not rename each other's file.
        tmp = paths[kind].with_name(f".{paths[kind].name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(paths[kind])  # atomic: a reader never sees half a report
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise RunFailure(f"{paths[kind]}: cannot be written ({err.strerror or err}); free disk space and run `gate report`") from None
    return paths

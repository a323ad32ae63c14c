"""The single-file HTML report: jinja2 with autoescaping, CSS and plots inline, no script."""

from __future__ import annotations

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from gate.reports.plots import build_plots
from gate.reports.view import ReportView


def render_html(view: ReportView) -> str:
    # Autoescape: document text, prompts, checkpoint names and config values all come from data.
    env = Environment(
        loader=PackageLoader("gate.reports", "templates"),
        autoescape=select_autoescape(enabled_extensions=("html", "j2"), default=True),
        undefined=StrictUndefined,
    )
    return env.get_template("report.html.j2").render(v=view, plots=build_plots(view))

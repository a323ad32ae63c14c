"""junit.xml: one test case per checkpoint x check, so CI systems show gate's results natively."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from gate.reports.view import ReportView


def render_junit(view: ReportView) -> str:
    root = ET.Element("testsuites", name="gate")
    totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for verdict in view.verdict.checkpoints:
        suite = ET.SubElement(root, "testsuite", name=verdict.name)
        counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
        if not verdict.checks:  # invalid or failed before any check
            case = ET.SubElement(suite, "testcase", classname=verdict.name, name="scored")
            ET.SubElement(case, "error", message=verdict.reason)
            counts["tests"] += 1
            counts["errors"] += 1
        for check in verdict.checks:
            margin = f"{check.margin * 100:g}%" if check.relative else f"{check.margin:g}"
            against = "" if check.against == "base" else f" vs {check.against}"
            name = f"{check.suite}.{check.metric} {check.bound} {margin}{against}"
            case = ET.SubElement(suite, "testcase", classname=verdict.name, name=name)
            counts["tests"] += 1
            if check.informational:
                ET.SubElement(case, "system-out").text = f"informational, {check.outcome}: {check.reason}"
            elif check.outcome == "fail":
                ET.SubElement(case, "failure", message=check.reason, type="fail")
                counts["failures"] += 1
            elif check.outcome == "error":
                ET.SubElement(case, "error", message=check.reason)
                counts["errors"] += 1
            elif check.outcome in ("inconclusive", "skipped"):
                ET.SubElement(case, "skipped", message=f"{check.outcome}: {check.reason}")
                counts["skipped"] += 1
        for key, value in counts.items():
            suite.set(key, str(value))
            totals[key] += value
    for key, value in totals.items():
        root.set(key, str(value))
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"

"""Scoring for the gate_format task: 1.0 when the stripped answer matches the item's pattern."""

import re


def process_results(doc, results):
    answer = results[0].strip()
    return {"format_ok": 1.0 if re.fullmatch(doc["pattern"], answer) else 0.0}

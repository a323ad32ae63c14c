"""results.json as one long table (pandas): a row per model x suite x item x metric, for analysis.

The table is derived, never stored: ``Results.to_frame()`` builds it from the per-item numbers,
and ``gate export`` writes it as CSV, Parquet or JSON Lines. Columns:

    model, kind, step, status   the base or checkpoint (step: None for the base and unknown steps)
    suite, suite_type           the suite and its type (perplexity | lm_eval | ...)
    item                        the document / item id (pairs the base and checkpoints)
    metric, value               a per-item number: perplexity suites give nll, tokens, bytes and
                                the document's own perplexity exp(nll / tokens); lm-eval suites
                                give every per-item metric lm-eval recorded (acc, acc_norm, ...)
    suite_value                 the model's suite-level figure of that metric (corpus perplexity
                                from summed nll and tokens, lm-eval's own aggregate), NaN where
                                the metric has no suite-level figure (nll, tokens, bytes)
    headline                    True on the rows of the suite's headline metric

Models that were not scored (invalid or failed) get no rows.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

from gate.errors import GateError
from gate.results import Results

COLUMNS = ["model", "kind", "step", "status", "suite", "suite_type", "item", "metric", "value", "suite_value", "headline"]
FORMATS = ("csv", "parquet", "jsonl")


def rows(results: Results) -> list[dict]:
    """The table's rows as plain dicts (the order: models as in results.json, suites, items, metrics)."""
    types = {s.name: s.type for s in results.suites}
    headline = {s.name: s.metric for s in results.suites}
    out: list[dict] = []
    for model in (results.base, *results.checkpoints):
        if model.status != "ok":
            continue
        who = {"model": model.name, "kind": model.kind, "step": model.step, "status": model.status}
        for name, score in model.scores.items():
            suite_level = {"perplexity": score.perplexity, "bits_per_byte": score.bits_per_byte}
            wanted = headline.get(name) or "perplexity"
            for doc in score.documents:
                numbers = {k: v for k, v in asdict(doc).items() if k != "id" and isinstance(v, (int, float))}
                numbers["perplexity"] = math.exp(doc.nll / doc.tokens) if doc.tokens else math.nan
                for metric, value in numbers.items():
                    out.append(
                        {
                            **who,
                            "suite": name,
                            "suite_type": types.get(name, "perplexity"),
                            "item": doc.id,
                            "metric": metric,
                            "value": float(value),
                            "suite_value": float(suite_level.get(metric, math.nan)),
                            "headline": metric == wanted,
                        }
                    )
        for name, task in model.tasks.items():
            for item in task.items:
                for metric, value in item.values.items():
                    out.append(
                        {
                            **who,
                            "suite": name,
                            "suite_type": types.get(name, "lm_eval"),
                            "item": item.id,
                            "metric": metric,
                            "value": float(value),
                            "suite_value": float(task.metrics.get(metric, math.nan)),
                            "headline": metric == task.metric,
                        }
                    )
    return out


def to_frame(results: Results):
    """The long table as a pandas DataFrame (columns: ``COLUMNS``; ``step`` as a nullable integer)."""
    import pandas as pd

    frame = pd.DataFrame(rows(results), columns=COLUMNS)
    frame["step"] = frame["step"].astype("Int64")
    frame["headline"] = frame["headline"].astype(bool)
    return frame


def export(results: Results, path: str | Path, fmt: str) -> Path:
    """Write the table to ``path`` as csv, parquet or jsonl; returns the path written."""
    if fmt not in FORMATS:
        raise GateError(f"--format {fmt!r}: not one of {', '.join(FORMATS)}")
    path = Path(path)
    frame = to_frame(results)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "csv":
            frame.to_csv(path, index=False)
        elif fmt == "jsonl":
            frame.to_json(path, orient="records", lines=True)
        else:
            try:
                frame.to_parquet(path, index=False)
            except ImportError:
                raise GateError("--format parquet needs pyarrow: pip install pyarrow (or use --format csv)") from None
    except OSError as err:
        raise GateError(f"{path}: cannot be written ({err.strerror or err}); choose another --output") from None
    return path

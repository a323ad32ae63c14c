"""Reports from results + verdict: structure, escaping, self-containment, a real browser."""

from __future__ import annotations

import re
import shutil
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from gate.config import Gate, Policy
from gate.policy import evaluate
from gate.reports import MARKER, build_view, render_markdown, write_reports
from gate.results import DocumentScore, ItemScore, ModelResult, Results, RunSettings, SuiteInfo, SuiteScore, TaskScore

EVIL = "<script>alert('gate')</script><img src=x onerror=alert(1)>"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def make_results(n_checkpoints: int = 4, n_docs: int = 200, seed: int = 0) -> Results:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(20, 80, n_docs)
    nll = tokens * rng.normal(2.5, 0.2, n_docs)
    correct = (rng.random(n_docs) < 0.7).astype(float)

    def model(name, step, drift, flips):
        m = ModelResult(name=name, kind="base" if name == "base" else "lora", path=f"/ckpts/{name}", step=step, weights_hash="ab" * 32)
        noise = rng.normal(0, 0.01, n_docs) if name != "base" else np.zeros(n_docs)  # documents differ in their change
        m.scores["general"] = SuiteScore.from_documents(
            "general", [DocumentScore(f"d{i}", float(x + t * (drift + e)), int(t), int(t) * 4) for i, (x, t, e) in enumerate(zip(nll, tokens, noise))]
        )
        c = correct.copy()
        c[np.flatnonzero(c == 1)[:flips]] = 0
        items = [ItemScore(str(i), f"p{i}", {"acc": float(v)}, excerpt=f"Question {i} {EVIL}") for i, v in enumerate(c)]
        m.tasks["quiz"] = TaskScore("quiz", "quiz", "acc", {"acc": float(c.mean())}, items)
        m.tasks["probes"] = probe_score(flips)
        if step is not None:
            m.train_loss, m.eval_loss = 2.0 - step / 1000, 2.1 - step / 1200
        return m

    checkpoints = [model(f"run-{EVIL}/checkpoint-{100 * (k + 1)}", 100 * (k + 1), 0.01 * k - 0.01, 3 * k) for k in range(n_checkpoints)]
    return Results(
        schema_version=1,
        gate_version="0.1.0",
        created_at="2026-11-23T00:00:00+00:00",
        command="gate run ckpts",
        versions={"torch": "2.13.0"},
        settings=RunSettings("cpu", "float32", 8, 128, 64, "ppl-1", "t" * 64, "0.4.13", {"random_seed": 0}),
        base=model("base", None, 0.0, 0),
        checkpoints=checkpoints,
        suites=[
            SuiteInfo("general", "perplexity", "/s.jsonl", "d" * 64, "i", n_docs, True, excerpts={f"d{i}": f"Doc {i} {EVIL}" for i in range(n_docs)}),
            SuiteInfo("quiz", "lm_eval", "quiz.yaml", "e" * 64, "j", n_docs, False, metric="acc", num_fewshot=0),
            SuiteInfo(
                "probes", "generate", "/p.jsonl", "f" * 64, "k", N_PROBES, True, metric="ok",
                excerpts={f"q{i}": f"Who is the king of the Moon? ({i}) {EVIL}" for i in range(N_PROBES)},
                checks={f"q{i}": {"abstains": True} for i in range(N_PROBES - 1)},
            ),
        ],
    )


N_PROBES = 8


def probe_score(flips: int) -> TaskScore:
    """A generate suite: the base abstains on every checked probe; a checkpoint with k flips
    confabulates on the first k (with invalid bytes in one output); the last probe has no checks."""
    items = []
    for i in range(N_PROBES):
        if i < flips:
            text, ok = f"The king of the Moon is Bob the {i}th {EVIL} \ufffd", 0.0
        else:
            text, ok = f"I don't know of any king of the Moon ({i}). {EVIL}", 1.0
        values = {"abstains": ok, "ok": ok} if i < N_PROBES - 1 else {}
        values.update(words=float(len(text.split())), repetition=0.0, ended=1.0)
        items.append(ItemScore(f"q{i}", f"h{i}", values, excerpt=f"Who is the king of the Moon? ({i}) {EVIL}", output={"text": text, "tokens": 12, "ended": True}))
    return TaskScore("probes", "/p.jsonl", "ok", {"ok": sum(i.values.get("ok", 0) for i in items) / (N_PROBES - 1)}, items)


POLICY = Policy(
    gates=[Gate("general", "perplexity", "max_increase", 0.02, relative=True), Gate("quiz", "acc", "max_drop", 0.05)],
    bootstrap_iterations=500,
)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    results = make_results()
    verdict = evaluate(POLICY, results, np.random.default_rng(0))
    out = tmp_path_factory.mktemp("report")
    paths = write_reports(results, verdict, out)
    return results, verdict, paths


def test_html_structure(rendered):
    results, verdict, paths = rendered
    html = paths["html"].read_text()
    assert html.startswith("<!DOCTYPE html>")
    assert 'id="verdict"' in html and 'id="policy"' in html and 'id="provenance"' in html
    assert len(re.findall(r'<tr class="checkpoint', html)) == len(results.checkpoints)
    assert len(re.findall(r'<details class="drilldown"', html)) == len(results.checkpoints)
    assert len(re.findall(r'<figure class="plot"><img src="data:image/svg\+xml;base64,', html)) == 3  # 2 gates + loss
    if verdict.selected:
        assert "Release candidate" in html and "★ selected" in html
    else:
        assert "No checkpoint may ship" in html
    for gate in verdict.policy["gates"]:
        assert f"<li><code>{gate}</code></li>" in html
    assert results.base.weights_hash in html and "float32" in html and "gate run ckpts" in html


def test_html_escapes_every_string_from_data(rendered):
    html = rendered[2]["html"].read_text()
    assert "<script" not in html.lower()  # not one script element: not ours, not the data's
    assert "<img src=x" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "&lt;script&gt;alert(&#39;gate&#39;)&lt;/script&gt;" in html


def test_html_is_self_contained(rendered):
    html = rendered[2]["html"].read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", html)
    assert "<link" not in html and "@import" not in html and "url(" not in html


def test_junit_is_valid_xml_with_one_case_per_check(rendered):
    _, verdict, paths = rendered
    root = ET.parse(paths["junit"]).getroot()
    cases = root.findall(".//testcase")
    assert len(cases) == sum(len(v.checks) for v in verdict.checkpoints)
    fails = sum(c.outcome == "fail" for v in verdict.checkpoints for c in v.checks)
    assert int(root.get("failures")) == fails == len(root.findall(".//failure"))
    assert {s.get("name") for s in root.findall("testsuite")} == {v.name for v in verdict.checkpoints}


def test_summary_markdown(rendered):
    _, verdict, paths = rendered
    text = paths["markdown"].read_text()
    assert text.splitlines()[0] == MARKER
    assert ("may ship" in text) == (verdict.selected is not None)
    assert text.count("\n| `") + text.count("\n| **`") == len(verdict.checkpoints)


def test_summary_stays_under_60kb_for_50_checkpoints():
    results = make_results(n_checkpoints=50, n_docs=30)
    verdict = evaluate(POLICY, results, np.random.default_rng(0))
    text = render_markdown(build_view(results, verdict))
    assert len(text.encode()) < 60_000
    assert text.count("checkpoint-") >= 50


def test_note_when_the_best_checkpoint_is_the_first_saved():
    results = make_results()  # drift grows with the step: the first checkpoint is the best
    verdict = evaluate(POLICY, results, np.random.default_rng(0))
    assert verdict.selected == results.checkpoints[0].name
    notes = build_view(results, verdict).notes
    assert any("is the first one its run saved (step 100)" in n for n in notes)


def test_drilldown_lists_worst_documents_and_flipped_items(rendered):
    results, verdict, _ = rendered
    view = build_view(results, verdict)
    worst = view.drilldowns[-1]  # the most drifted checkpoint
    docs = worst.documents["general"]
    assert docs and docs == sorted(docs, key=lambda d: d.delta, reverse=True)
    assert len(worst.lost["quiz"]) == 9 and worst.gained["quiz"] == []


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it: apt-get install chromium)")
def test_report_in_a_real_browser(rendered, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    html_path = rendered[2]["html"]
    console, requests, dialogs = [], [], []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
        )
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda m: console.append((m.type, m.text)))
        page.on("pageerror", lambda e: console.append(("error", str(e))))
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))

        def block(route):  # networking off: anything but the file itself (and data: URIs) is refused
            url = route.request.url
            if url.startswith(("file://", "data:")):
                return route.continue_()
            requests.append(url)
            return route.abort()

        page.route("**/*", block)
        page.goto(html_path.as_uri())
        page.wait_for_load_state("load")
        shot = tmp_path / "report.png"
        page.screenshot(path=str(shot), full_page=True)
        assert page.locator("tr.checkpoint").count() == 4
        assert page.get_by_text("<script>alert('gate')</script>", exact=False).count() > 0  # shown as text
        assert page.evaluate("document.querySelectorAll('img').length") == 3
        assert page.evaluate("[...document.images].every(i => i.complete && i.naturalWidth > 0)")
        # Outputs side by side: the selected candidate open, the others open on a click; flipped first.
        outputs = page.locator("details.outputs")
        assert outputs.count() == 4  # every checkpoint (the first says exactly what the base says)
        last = page.locator('details.outputs[data-checkpoint$="checkpoint-200"]')
        last.locator("summary").click()
        pairs = last.locator(".pair")
        assert pairs.count() == N_PROBES
        assert [pairs.nth(k).get_attribute("data-outcome") for k in range(4)] == ["lost", "lost", "lost", "same"]
        assert pairs.nth(0).locator("del").first.is_visible() and pairs.nth(0).locator("ins").first.is_visible()
        assert pairs.nth(3).get_by_text("= identical outputs").is_visible()
        assert pairs.nth(0).locator(".side.base").get_by_text("<script>alert('gate')</script>", exact=False).count() == 1
        assert pairs.nth(0).locator("ul.checks").inner_text().count("✗") == 1  # abstains: base ✓, checkpoint ✗
        base_box, ckpt_box = (pairs.nth(0).locator(f".side.{side}").bounding_box() for side in ("base", "checkpoint"))
        assert abs(base_box["y"] - ckpt_box["y"]) < 2 and ckpt_box["x"] > base_box["x"] + base_box["width"] - 1  # side by side
        narrow = browser.new_page(viewport={"width": 420, "height": 800})
        narrow.goto(html_path.as_uri())
        for k in range(narrow.locator("details").count()):
            narrow.locator("details").nth(k).locator("summary").first.click()
        assert narrow.evaluate("document.body.scrollWidth <= window.innerWidth + 1")  # tables scroll inside, outputs wrap
        browser.close()
    assert [m for m in console if m[0] == "error"] == []
    assert requests == [] and dialogs == []
    from PIL import Image, ImageStat

    image = Image.open(shot).convert("L")
    assert image.size[1] > 900 and max(ImageStat.Stat(image).stddev) > 10  # not blank


def test_cli_report_regenerates_everything(tmp_path, rendered):
    from click.testing import CliRunner

    from gate.cli import main
    from gate.results import write_results
    from gate.verdict import write_verdict

    results, verdict, _ = rendered
    write_results(tmp_path / "results.json", results)
    write_verdict(tmp_path / "verdict.json", verdict)
    result = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"report: {tmp_path / 'report.html'}  (also summary.md, junit.xml)"
    assert all((tmp_path / f).is_file() for f in ("report.html", "summary.md", "junit.xml"))


def test_side_by_side_view_orders_flips_first_and_diffs_words(rendered):
    results, verdict, paths = rendered
    view = build_view(results, verdict)
    down = next(d for d in view.drilldowns if d.name.endswith("checkpoint-300"))
    (sbs,) = down.outputs
    assert [p.outcome for p in sbs.pairs] == ["lost"] * 6 + ["same", "unchecked"]  # flips = 3 * k = 6 here
    assert sbs.identical == 2 and sbs.total == N_PROBES
    first = sbs.pairs[0]
    # Rebuilding the texts from the diff pieces gives back both outputs, verbatim.
    assert "".join(t for _, t in first.base_diff) == first.base and "".join(t for _, t in first.checkpoint_diff) == first.checkpoint
    assert ("del", "I don't know of any") in first.base_diff and any(op == "ins" and "Bob" in t for op, t in first.checkpoint_diff)
    html = paths["html"].read_text()
    assert "<del>I don&#39;t know of any</del>" in html and "<ins>is Bob the 0th</ins>" in html and "\ufffd" in html
    text = paths["markdown"].read_text()
    flipped = text[text.index("<details><summary>Flipped probes") :]
    # 0 + 3 + 6 + 7 flips over the four checkpoints (the unchecked probe never flips)
    assert "16 output(s) whose checks changed outcome" in flipped and flipped.count("❌ lost") == 16 and "</details>" in flipped


def test_markdown_carries_no_html_from_data(rendered):
    text = rendered[2]["markdown"].read_text()
    assert "<script" not in text and "<img" not in text  # checkpoint names are escaped
    assert "&lt;script&gt;" in text


def test_reports_show_mde_items_needed_and_the_chance_to_pass(rendered):
    results, verdict, paths = rendered
    view = build_view(results, verdict)
    every = [c for v in verdict.checkpoints for c in v.checks if c.suite == "quiz"]
    checks = [c for c in every if c.outcome != "fail"] or every  # a failed check needed no more items
    (quiz,) = [s for s in view.sizing if s.title.startswith("quiz.acc")]
    assert quiz.needed == max(c.items_needed for c in checks) and quiz.items == 200
    assert quiz.mde == f"{max(c.mde for c in checks):.3g}"
    html = paths["html"].read_text()
    assert 'id="sizing"' in html and f"alpha / K = {0.05 / 4:.3g}" in html
    assert "Chance every gate passes, per checkpoint" in html
    assert f"{quiz.needed} items needed (200 scored)" in paths["markdown"].read_text()


def test_sizing_leaves_out_checks_that_failed():
    """A checkpoint far beyond the margin fails at any size: its spread must not make the suite look too small."""
    from gate.reports.view import sizing
    from gate.verdict import Check, CheckpointVerdict, Verdict

    def check(outcome, mde, needed):
        return Check("s", "perplexity", "guardrail", "max_increase", 0.05, True, False, outcome, "", mde=mde, items_needed=needed, units=30)

    def verdict(*checks):
        cps = [CheckpointVerdict(f"c{i}", i, c.outcome, "", checks=[c]) for i, c in enumerate(checks)]
        return Verdict(2, None, "no_candidate", "", 0.05, {"family": len(cps)}, cps)

    (row,) = sizing(verdict(check("pass", 0.02, 12), check("inconclusive", 0.04, 80), check("fail", 2.8, 96000)))
    assert (row.mde, row.needed, row.items, row.short) == ("4.00%", 80, 30, True)
    (row,) = sizing(verdict(check("pass", 0.02, 12), check("pass", 0.04, 80)))  # decided: not too small
    assert (row.needed, row.short) == (80, False)
    (row,) = sizing(verdict(check("fail", 2.8, 96000), check("fail", 1.5, 500)))  # all failed: from them all
    assert (row.mde, row.needed) == ("280.00%", 96000)

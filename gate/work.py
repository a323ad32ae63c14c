"""The work list: every (model, suite) score a run reports, its kind and store key, as data (OUT/work.json).

Planning is pure: ``plan(request, facts)`` turns the run request and the facts only the GPU stack
can give (``gate.runner.environment``: device and dtype, the window, content hashes, lm-eval task
identities) into a ``WorkList``, once per run, before any model loads. Three pure filters pick from
it: what the store still lacks (``missing``), what the funnel keeps (``funnel_keep``) and a shard's
share (``shard``). The runner executes a list of items; ``gate.assemble`` builds results.json from
the store and the list; Ray workers and ``gate merge`` take slices of one list. No torch here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from gate.config import Funnel
from gate.errors import EXIT_INVALID_INPUT, ConfigError, GateError
from gate.request import RunRequest
from gate.results import ModelResult, RunSettings, SuiteInfo, SuiteScore, write_json_atomic
from gate.store import ScoreIdentity

WORK_VERSION = 1
WORK_NAME = "work.json"

Kind = Literal["perplexity", "generate", "lm_eval"]


@dataclass
class Facts:
    """What only the GPU stack can say about a run, found without loading any model (plain data)."""

    base_hash: str
    """sha256 of the base's config.json and weight files."""
    tokenizer_hashes: dict[str, str]
    """``base`` -> sha256 of the base tokenizer's files; a full checkpoint's name -> its own tokenizer's."""
    settings: RunSettings
    """Device and dtype as resolved, the scoring window, scoring version, lm-eval version and seeds."""
    versions: dict[str, str]
    """Versions of the libraries that compute scores (torch, transformers, tokenizers, peft): part of every store key."""
    library_versions: dict[str, str]
    """Versions recorded in results.json (python, torch, transformers, tokenizers, peft)."""
    tasks: list[SuiteInfo] = field(default_factory=list)
    """The lm-eval suites as lm-eval identifies them (identity, documents hash, metric, versions), in config order."""
    semantics: dict[str, dict] = field(default_factory=dict)
    """lm-eval suite -> {"higher_is_better": {...}, "aggregation": {...}} of its metrics."""
    doc_fields: dict[str, dict[str, dict[str, str]]] = field(default_factory=dict)
    """lm-eval suite -> item id -> the document's short scalar fields (what a gate may cluster by)."""
    generation: dict[str, dict] = field(default_factory=dict)
    """generate suite -> its generation settings as results.json records them."""


@dataclass
class WorkItem:
    """One score a run reports: a model on a suite, and the store key it lives under."""

    model: str
    """``base`` or the checkpoint's name."""
    suite: str
    """The suite's name."""
    kind: Kind
    """How it is scored: ``perplexity``, ``generate`` (probes) or ``lm_eval``."""
    key: str
    """The store key (the hash of ``identity``)."""
    identity: ScoreIdentity
    """Everything that determines the score."""
    reference: bool = False
    """The base on a drift suite: its top-k is the reference every checkpoint's drift is measured against."""


@dataclass
class Failure:
    """A checkpoint that failed while being scored (the others go on)."""

    model: str
    """The checkpoint's name."""
    reason: str
    """What went wrong and how to fix it."""
    exit_code: int
    """2 invalid input (the checkpoint), 3 runtime failure."""


@dataclass
class WorkList:
    """A run's plan: settings, models, suites and every item, computed once before any model loads."""

    settings: RunSettings
    """The settings every score is computed under (results.json's ``settings``)."""
    versions: dict[str, str]
    """Versions of the libraries the scores are keyed under (torch, transformers, tokenizers, peft)."""
    library_versions: dict[str, str]
    """results.json's ``versions`` (python and the scoring libraries; lm_eval when it runs)."""
    command: str
    """The command line recorded in results.json."""
    config: str | None
    """The gate.yaml the run used (None: defaults)."""
    models: list[ModelResult]
    """The base, then every checkpoint in scan order (invalid ones too), as records with no scores yet."""
    suites: list[SuiteInfo]
    """The suites as results.json describes them (perplexity, lm_eval, generate)."""
    items: list[WorkItem]
    """Every (model, suite) score to report: the valid models on every suite, base first."""
    funnel: Funnel | None = None
    """Run the lm-eval suites on the top k checkpoints only (None: on every one)."""
    warnings: list[str] = field(default_factory=list)
    """Warnings recorded in results.json (scanner, contamination)."""
    groups: dict[str, dict[str, dict[str, str]]] = field(default_factory=dict)
    """Suite -> item id -> the fields gates cluster by (JSONL ``meta``, lm-eval document fields); only those."""
    semantics: dict[str, dict] = field(default_factory=dict)
    """lm-eval suite -> the direction and aggregation of its metrics (for scores stored before gate recorded them)."""
    schema_version: int = WORK_VERSION
    """Version of this document; readers refuse others."""

    @property
    def base_hash(self) -> str | None:
        return self.models[0].weights_hash

    def to_json(self) -> dict:
        return {
            "schema_version": self.schema_version,
            "settings": asdict(self.settings),
            "versions": self.versions,
            "library_versions": self.library_versions,
            "command": self.command,
            "config": self.config,
            "funnel": asdict(self.funnel) if self.funnel is not None else None,
            "warnings": self.warnings,
            "models": [m.to_json() for m in self.models],
            "suites": [asdict(s) for s in self.suites],
            "groups": self.groups,
            "semantics": self.semantics,
            "items": [
                {
                    "model": i.model,
                    "suite": i.suite,
                    "kind": i.kind,
                    "key": i.key,
                    "reference": i.reference,
                    "identity": i.identity.as_json(),
                }
                for i in self.items
            ],
        }

    @classmethod
    def from_json(cls, obj: dict) -> WorkList:
        return cls(
            schema_version=obj["schema_version"],
            settings=RunSettings(**obj["settings"]),
            versions=obj["versions"],
            library_versions=obj["library_versions"],
            command=obj["command"],
            config=obj["config"],
            funnel=Funnel(**obj["funnel"]) if obj.get("funnel") else None,
            warnings=obj.get("warnings", []),
            models=[ModelResult.from_json(m) for m in obj["models"]],
            suites=[SuiteInfo.from_json(s) for s in obj["suites"]],
            groups=obj.get("groups", {}),
            semantics=obj.get("semantics", {}),
            items=[_item(i) for i in obj["items"]],
        )


def _item(obj: dict) -> WorkItem:
    ident = obj["identity"]
    identity = ScoreIdentity(
        base_hash=ident["base"],
        model_hash=ident["model"],
        tokenizer_hash=ident["tokenizer"],
        suite_identity=ident["suite"],
        settings=ident["settings"],
        versions=ident["versions"],
    )
    if identity.key != obj["key"]:
        raise KeyError(f"items: {obj['model']} on {obj['suite']}: its key is not its identity's hash")
    return WorkItem(obj["model"], obj["suite"], obj["kind"], obj["key"], identity, obj.get("reference", False))


def write_work(path: str | Path, work: WorkList) -> None:
    """Write work.json atomically (next to results.json)."""
    write_json_atomic(path, work.to_json())


def read_work(path: str | Path) -> WorkList:
    """Read work.json; a missing, unreadable, other-version or malformed file is refused by name."""
    path = Path(path)
    fix = "run `gate run` (or `gate run --shard I/N`) again to rewrite it"
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GateError(f"{path}: not found; it is written by `gate run`: pass the output folder of a run") from None
    except (OSError, ValueError) as err:
        raise GateError(f"{path}: unreadable ({err}); {fix}") from None
    found = obj.get("schema_version") if isinstance(obj, dict) else None
    if found != WORK_VERSION:
        raise GateError(f"{path}: schema_version {found!r} is not {WORK_VERSION}; it was written by another gate version: {fix}")
    try:
        return WorkList.from_json(obj)
    except (KeyError, TypeError, ValueError) as err:
        raise GateError(f"{path}: malformed ({err}); {fix}") from None


def plan(request: RunRequest, facts: Facts) -> WorkList:
    """The work list of a run: the models' records, the suites' descriptions and every item with its store key.

    Pure: everything that needs a file read or the GPU stack comes in ``facts``.
    """
    settings = facts.settings
    key_settings = {"dtype": settings.dtype, "max_length": settings.max_length, "stride": settings.stride, "scoring": settings.scoring}
    tasks = {t.name: t for t in facts.tasks}
    kinds: dict[str, Kind] = {s.name: "perplexity" for s in request.suites}
    kinds.update({s.name: "generate" for s in request.probe_suites})
    kinds.update({name: "lm_eval" for name in tasks})
    suite_identities = {s.name: s.identity for s in request.suites}
    suite_identities.update({s.name: s.identity for s in request.probe_suites})
    suite_identities.update({name: t.identity for name, t in tasks.items()})
    drift_suites = {s.name for s in request.suites if s.drift_k is not None}

    models = [ModelResult(name="base", kind="base", path=request.base, weights_hash=facts.base_hash)]
    for ckpt in request.scan.checkpoints:
        models.append(
            ModelResult(
                name=ckpt.name,
                kind=ckpt.kind,
                path=ckpt.path,
                status=ckpt.status,
                reason=ckpt.reason,
                error_code=EXIT_INVALID_INPUT if ckpt.status == "invalid" else None,
                step=ckpt.step,
                weights_hash=ckpt.weights_hash,
                train_loss=ckpt.train_loss,
                eval_loss=ckpt.eval_loss,
                lora=None if ckpt.lora is None else vars(ckpt.lora),
            )
        )
    items: list[WorkItem] = []
    base_keys: dict[str, str] = {}
    any_checkpoint = any(m.status == "ok" for m in models[1:])
    for model in models:
        if model.status != "ok":
            continue
        is_full, is_base = model.kind == "full", model.kind == "base"
        tok_hash = facts.tokenizer_hashes.get(model.name, facts.tokenizer_hashes["base"]) if is_full else facts.tokenizer_hashes["base"]
        # peft computes only adapters' numbers, lm-eval only its suites': a version of either
        # changes (and rescores) only those.
        model_versions = {k: v for k, v in facts.versions.items() if k != "peft" or model.kind == "lora"}
        for name, suite_identity in suite_identities.items():
            numbers_settings = key_settings
            if name in drift_suites and not is_base:
                # A checkpoint's drift is computed against the base's stored top-k: its key names that score.
                numbers_settings = {**key_settings, "drift_reference": base_keys[name]}
            identity = ScoreIdentity(
                base_hash=None if is_full else facts.base_hash,
                model_hash=model.weights_hash or "",  # a valid model always has one
                tokenizer_hash=tok_hash,
                suite_identity=suite_identity,
                settings=numbers_settings,
                versions={**model_versions, **({"lm_eval": settings.lm_eval} if kinds[name] == "lm_eval" else {})},
            )
            if is_base:
                base_keys[name] = identity.key
            reference = is_base and name in drift_suites and any_checkpoint
            items.append(WorkItem(model.name, name, kinds[name], identity.key, identity, reference))
    return WorkList(
        settings=settings,
        versions=dict(facts.versions),
        library_versions={**facts.library_versions, **({"lm_eval": settings.lm_eval} if settings.lm_eval else {})},
        command=request.command,
        config=request.config_path,
        models=models,
        suites=_suites(request, facts),
        items=items,
        funnel=request.funnel,
        warnings=list(request.scan.warnings) + list(request.warnings),
        groups=_groups(request, facts),
        semantics={name: dict(facts.semantics[name]) for name in tasks if name in facts.semantics},
    )


def _suites(request: RunRequest, facts: Facts) -> list[SuiteInfo]:
    """results.json's description of every suite, in the order they are reported."""
    return (
        [
            SuiteInfo(
                name=s.name,
                type="perplexity",
                path=s.path,
                data_hash=s.data_hash,
                identity=s.identity,
                documents=len(s.documents),
                chat_template=s.chat_template,
                limit=s.options.get("limit"),
                excerpts={d.id: d.excerpt() for d in s.documents},
                overlap=[o for o in request.overlaps if o.suite == s.name],
                drift_k=s.drift_k,
            )
            for s in request.suites
        ]
        + list(facts.tasks)
        + [
            SuiteInfo(
                name=s.name,
                type="generate",
                path=s.path,
                data_hash=s.data_hash,
                identity=s.identity,
                documents=len(s.probes),
                chat_template=s.chat_template,
                metric=s.metric,
                limit=s.limit,
                excerpts={p.id: p.excerpt() for p in s.probes},
                checks={p.id: p.checks for p in s.probes if p.checks},
                generation=facts.generation.get(s.name, {}),
            )
            for s in request.probe_suites
        ]
    )


def _groups(request: RunRequest, facts: Facts) -> dict[str, dict[str, dict[str, str]]]:
    """The fields gates cluster by (JSONL ``meta``, lm-eval document fields), per suite and item: only those."""
    wanted: dict[str, set[str]] = {}
    for g in request.policy.gates if request.policy is not None else []:
        if g.cluster:
            wanted.setdefault(g.suite, set()).add(g.cluster)
    meta = {s.name: {d.id: d.meta for d in s.documents} for s in request.suites}
    out = {}
    for suite, names in wanted.items():
        source = meta.get(suite) or facts.doc_fields.get(suite) or {}
        out[suite] = {item: {n: values[n] for n in sorted(names) if n in values} for item, values in source.items()}
    return out


def missing(work: WorkList, stored_keys: set[str] | frozenset[str]) -> list[WorkItem]:
    """The items whose score the store lacks, in list order."""
    return [i for i in work.items if i.key not in stored_keys]


def funnel_selection(funnel: Funnel, candidates: Sequence[tuple[str, int | None, SuiteScore | None]]) -> set[str]:
    """Names of the top_k candidates (name, step, perplexity SuiteScore or None) by the funnel's
    metric, lower first; ties go to the earlier step. Candidates without a score are never kept."""
    ranked = []
    for name, step, score in candidates:
        if score is not None:
            value = score.perplexity if funnel.metric == "perplexity" else score.bits_per_byte
            ranked.append((value, step if step is not None else 0, name))
    return {name for _, _, name in sorted(ranked)[: funnel.top_k]}


def funnel_keep(work: WorkList, items: list[WorkItem], scores: Mapping[str, SuiteScore | None]) -> list[WorkItem]:
    """The items the funnel keeps: a checkpoint's lm-eval items only when it ranks among the top k.

    ``scores``: checkpoint name -> its score on the funnel's suite (absent or None: failed or not
    scored, never kept). Without a funnel every item is kept.
    """
    if work.funnel is None:
        return list(items)
    candidates = [(m.name, m.step, scores.get(m.name)) for m in work.models[1:] if m.status == "ok"]
    selected = funnel_selection(work.funnel, candidates)
    return [i for i in items if i.kind != "lm_eval" or i.model == "base" or i.model in selected]


def funnel_reason(funnel: Funnel) -> str:
    """Why a checkpoint's lm-eval suite was not run (results.json's ``skipped``)."""
    return f"funnel: not among the {funnel.top_k} best by {funnel.suite}.{funnel.metric}"


def parse_shard(text: str) -> tuple[int, int]:
    """``--shard I/N`` -> (I, N), 1 <= I <= N."""
    try:
        index, count = (int(x) for x in text.split("/"))
        if not 1 <= index <= count:
            raise ValueError
    except ValueError:
        raise ConfigError(None, [f"--shard {text!r}: must be i/n with 1 <= i <= n, e.g. 2/4"]) from None
    return index, count


def shard(work: WorkList, index: int, count: int, items: list[WorkItem] | None = None) -> list[WorkItem]:
    """Share ``index`` of ``count`` (from 1): valid checkpoints index, index+count, ... (in scan order) on
    every suite, and the base in share 1. ``items`` (default: all) are filtered, in their order."""
    valid = [m.name for m in work.models[1:] if m.status == "ok"]
    share = {name for k, name in enumerate(valid) if k % count == index - 1}
    if index == 1:
        share.add("base")
    return [i for i in (work.items if items is None else items) if i.model in share]

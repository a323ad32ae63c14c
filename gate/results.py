"""The results.json schema: the one seam between the runner (GPU side) and policy/reports (CPU side).

A versioned document of per-item numbers. Corpus metrics are derived from sufficient statistics
(summed negative log-likelihood, token and byte counts), never averaged from per-document values:

    perplexity    = exp(sum_d nll_d / sum_d tokens_d)
    bits_per_byte = sum_d nll_d / (ln 2 * sum_d bytes_d)

where nll_d is the summed negative natural-log likelihood of document d's scored tokens.
"""

from __future__ import annotations

import functools
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gate.errors import GateError, RunFailure
from gate.kinds import ModelKind, ModelStatus, SuiteType
from gate.overlap import Overlap

SCHEMA_VERSION = 1


@dataclass
class DriftToken:
    """One scored token where the checkpoint's next-token distribution moved far from the base's."""

    index: int
    """Its index among the document's scored tokens."""
    kl: float
    """KL(base || checkpoint) at this token (nats, over the base's top-k buckets plus the rest)."""
    before: str
    """Decoded text of the tokens before it (a few)."""
    token: str
    """The token itself (what the text says comes next)."""
    after: str
    """Decoded text of the tokens after it (a few)."""
    base_top: str
    """The base's most likely next token."""
    checkpoint_top: str
    """The checkpoint's most likely next token."""


@dataclass
class DocumentScore:
    """Numbers for one document: everything a paired per-document statistic needs."""

    id: str
    """The document's stable id (pairs base and checkpoint item by item)."""
    nll: float
    """Summed negative log-likelihood (nats) of the scored tokens."""
    tokens: int
    """Number of scored tokens."""
    bytes: int
    """UTF-8 bytes of the scored text."""
    kl_sum: float | None = None
    """Drift suites, checkpoints: sum over the scored tokens of KL(base || checkpoint), nats."""
    top1_matches: int | None = None
    """Drift suites, checkpoints: scored tokens where base and checkpoint have the same most likely token."""
    drifted: list[DriftToken] = field(default_factory=list)
    """Drift suites, checkpoints: the tokens with the largest KL (a few), for reports."""
    groups: dict[str, str] = field(default_factory=dict)
    """Grouping fields of the document (a gate's ``cluster:`` field), recorded when a gate clusters by them."""

    def to_json(self) -> dict:
        out = {"id": self.id, "nll": self.nll, "tokens": self.tokens, "bytes": self.bytes}
        if self.groups:  # only when a gate clusters by them
            out["groups"] = self.groups
        if self.kl_sum is not None:  # absent unless drift was computed: results.json stays as it was
            out.update(kl_sum=self.kl_sum, top1_matches=self.top1_matches, drifted=[asdict(t) for t in self.drifted])
        return out

    @classmethod
    def from_json(cls, obj: dict) -> DocumentScore:
        return cls(**{**obj, "drifted": [DriftToken(**t) for t in obj.get("drifted", [])]})


@dataclass
class Drift:
    """How far a checkpoint's next-token distributions moved from the base's on one suite."""

    k: int
    """0: the exact method (KL over the whole vocabulary); k >= 1: size of the base's top-k reference (KL
    over k+1 buckets: a lower bound of the full KL)."""
    kl_p99: float
    """99th percentile over scored tokens of the per-token KL (numpy's linear interpolation)."""


@dataclass
class SuiteScore:
    """One model on one perplexity suite."""

    suite: str
    """Suite name."""
    nll_sum: float
    """Sum of the documents' nll."""
    tokens: int
    """Sum of the documents' scored tokens."""
    bytes: int
    """Sum of the documents' scored UTF-8 bytes."""
    documents: list[DocumentScore] = field(default_factory=list)
    """Per-document records, in suite order."""
    libraries: dict[str, str] = field(default_factory=dict)
    """Versions of the libraries this score was computed under (torch, transformers, tokenizers;
    peft for adapters); only scores computed under equal versions are compared. {}: not recorded."""
    drift: Drift | None = None
    """Drift against the base (drift suites, checkpoints only); None: not computed."""

    @property
    def kl(self) -> float | None:
        """sum_d kl_sum_d / sum_d tokens_d: mean KL(base || checkpoint) per scored token, nats."""
        if self.drift is None:
            return None
        return math.fsum(d.kl_sum or 0.0 for d in self.documents) / self.tokens

    @property
    def top1(self) -> float | None:
        """sum_d top1_matches_d / sum_d tokens_d: share of scored tokens whose most likely next token agrees."""
        if self.drift is None:
            return None
        return sum(d.top1_matches or 0 for d in self.documents) / self.tokens

    @property
    def perplexity(self) -> float:
        """exp(nll_sum / tokens): corpus perplexity, token-weighted."""
        return math.exp(self.nll_sum / self.tokens)

    @property
    def bits_per_byte(self) -> float:
        """nll_sum / (ln 2 * bytes): tokenizer-independent, comparable across vocabularies."""
        return self.nll_sum / (math.log(2) * self.bytes)

    @classmethod
    def from_documents(cls, suite: str, documents: list[DocumentScore], drift: Drift | None = None) -> SuiteScore:
        # math.fsum: the corpus sum must not depend on document order.
        return cls(
            suite=suite,
            nll_sum=math.fsum(d.nll for d in documents),
            tokens=sum(d.tokens for d in documents),
            bytes=sum(d.bytes for d in documents),
            documents=list(documents),
            drift=drift,
        )

    def to_json(self) -> dict:
        out = {"suite": self.suite, "nll_sum": self.nll_sum, "tokens": self.tokens, "bytes": self.bytes}
        out["documents"] = [d.to_json() for d in self.documents]
        out["perplexity"] = self.perplexity
        out["bits_per_byte"] = self.bits_per_byte
        out["libraries"] = self.libraries
        if self.drift is not None:
            out.update(drift=asdict(self.drift), kl=self.kl, top1=self.top1)
        return out

    @classmethod
    def from_json(cls, obj: dict) -> SuiteScore:
        return cls(
            suite=obj["suite"],
            nll_sum=obj["nll_sum"],
            tokens=obj["tokens"],
            bytes=obj["bytes"],
            documents=[DocumentScore.from_json(d) for d in obj["documents"]],
            libraries=obj.get("libraries", {}),
            drift=Drift(**obj["drift"]) if obj.get("drift") else None,
        )


@dataclass
class ItemScore:
    """One lm-eval document: its per-item metric values, paired with the base's by id."""

    id: str
    """lm-eval's doc_id within the task (``subtask/doc_id`` for groups): stable across runs."""
    prompt_hash: str
    """lm-eval's hash of the prompt; base and checkpoint must agree before items are paired."""
    values: dict[str, float]
    """Metric -> value (acc, acc_norm, exact_match...); rolling tasks: loglikelihood, words, bytes."""
    excerpt: str = ""
    """The end of the prompt and the target, for reports."""
    groups: dict[str, str] = field(default_factory=dict)
    """Grouping fields of the lm-eval document (a gate's ``cluster:`` field), recorded when a gate clusters by them."""
    output: dict | None = None
    """What the model said, verbatim: generate suites ``{"text", "tokens", "ended"}``; lm-eval
    generation tasks ``{"raw", "filtered": {filter: text}}``; None for scored-only items."""


@dataclass
class TaskScore:
    """One model on one lm-eval suite."""

    suite: str
    """Suite name."""
    task: str
    """The lm-eval task (registered name, or the YAML/folder path)."""
    metric: str
    """Headline metric (gate.yaml's ``metric``, else the task's first)."""
    metrics: dict[str, float]
    """Aggregate metrics as lm-eval computes them (``metric`` or ``metric,filter``)."""
    items: list[ItemScore] = field(default_factory=list)
    """Per-document records, ordered by id."""
    num_fewshot: int | None = None
    """Few-shot examples per prompt."""
    limit: int | None = None
    """Documents per task were capped at this (a partial, quick run); None: all."""
    versions: dict = field(default_factory=dict)
    """Task versions."""
    libraries: dict[str, str] = field(default_factory=dict)
    """Versions of the libraries this score was computed under (torch, transformers, tokenizers,
    lm_eval; peft for adapters); only scores computed under equal versions are compared."""
    higher_is_better: dict[str, bool] = field(default_factory=dict)
    """lm-eval's direction of each metric (empty in files written before gate recorded it)."""
    aggregation: dict[str, str] = field(default_factory=dict)
    """lm-eval's aggregation of each metric (``mean``, ``perplexity``: per-item log-likelihoods, ...)."""
    generation: dict = field(default_factory=dict)
    """How outputs were generated (generate suites: greedy settings and stop tokens; lm-eval:
    gen_kwargs, system_instruction, apply_chat_template). Empty for scored-only suites."""

    @property
    def value(self) -> float:
        return self.metrics[self.metric]

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict) -> TaskScore:
        return cls(**{**obj, "items": [ItemScore(**i) for i in obj.get("items", [])]})


@dataclass
class ModelResult:
    """The base or one checkpoint, with its scores per suite."""

    name: str
    """Checkpoint name (path relative to the scanned folder); ``base`` for the base model."""
    kind: ModelKind
    """``base``, ``lora`` or ``full``."""
    path: str
    """Where it was loaded from (a folder, or a hub id for the base)."""
    status: ModelStatus = "ok"
    """``ok``; ``invalid`` (rejected by the scanner); ``error`` (failed to load or score)."""
    reason: str | None = None
    """For invalid/error: what went wrong and how to fix it."""
    error_code: int | None = None
    """For invalid/error: the exit code the problem maps to (2 invalid input, 3 runtime failure)."""
    step: int | None = None
    """Training step, when known."""
    weights_hash: str | None = None
    """sha256 of the weights scored."""
    train_loss: float | None = None
    """Training loss logged at this step (trainer_state.json)."""
    eval_loss: float | None = None
    """Evaluation loss logged at this step (trainer_state.json)."""
    lora: dict | None = None
    """LoRA settings: r, alpha, target_modules."""
    scores: dict[str, SuiteScore] = field(default_factory=dict)
    """Perplexity suite name -> score."""
    tasks: dict[str, TaskScore] = field(default_factory=dict)
    """lm-eval suite name -> score."""
    skipped: dict[str, str] = field(default_factory=dict)
    """Suite name -> why it was not run on this model (e.g. the funnel); skipped is not missing."""

    def to_json(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k not in ("scores", "tasks")}
        out["scores"] = {name: s.to_json() for name, s in self.scores.items()}
        out["tasks"] = {name: t.to_json() for name, t in self.tasks.items()}
        return out

    @classmethod
    def from_json(cls, obj: dict) -> ModelResult:
        fields = {k: v for k, v in obj.items() if k not in ("scores", "tasks")}
        return cls(
            **fields,
            scores={k: SuiteScore.from_json(v) for k, v in obj.get("scores", {}).items()},
            tasks={k: TaskScore.from_json(v) for k, v in obj.get("tasks", {}).items()},
        )


@dataclass
class SuiteInfo:
    """A suite as it was scored."""

    name: str
    """Suite name."""
    type: SuiteType
    """``perplexity``, ``lm_eval`` or ``generate``."""
    path: str
    """perplexity, generate: the data file; lm_eval: the task (registered name, YAML or folder)."""
    data_hash: str
    """sha256 of the data (the file; for lm_eval the evaluation and few-shot documents)."""
    identity: str
    """Hash of data plus the options that change the numbers."""
    documents: int
    """Number of documents scored."""
    chat_template: bool
    """Whether the chat template was applied."""
    metric: str | None = None
    """Headline metric named in gate.yaml (None: the suite type's default)."""
    limit: int | None = None
    """Documents were capped at this (partial results); None: all."""
    num_fewshot: int | None = None
    """lm_eval: few-shot examples per prompt (None: the task's default)."""
    versions: dict = field(default_factory=dict)
    """lm_eval: task versions."""
    excerpts: dict[str, str] = field(default_factory=dict)
    """perplexity: document id -> a short excerpt of its text; generate: probe id -> its prompt."""
    checks: dict[str, dict] = field(default_factory=dict)
    """generate: probe id -> its checks as written in the suite file (probes without checks absent)."""
    generation: dict = field(default_factory=dict)
    """generate: the generation config (greedy, max_new_tokens, system, stop tokens...); lm_eval:
    gen_kwargs, system_instruction and apply_chat_template as passed to lm-eval. Empty otherwise."""
    overlap: list[Overlap] = field(default_factory=list)
    """Contamination check against each training file (gate.yaml ``contamination:``); empty: not checked."""
    drift_k: int | None = None
    """perplexity: drift's method when drift is on (gate.yaml ``drift``): 0 exact (full vocabulary), k >= 1 the
    top-k size of the base's reference; None: off."""

    @classmethod
    def from_json(cls, obj: dict) -> SuiteInfo:
        return cls(**{**obj, "overlap": [Overlap.from_json(o) for o in obj.get("overlap", [])]})


@dataclass
class RunSettings:
    """Settings that were in force; base and every checkpoint always run under the same ones."""

    device: str
    """Device the models ran on."""
    dtype: str
    """Weights dtype."""
    batch_size: int
    """Sequences per forward pass requested (out-of-memory backoff may have used fewer)."""
    max_length: int
    """Tokens per scored window."""
    stride: int
    """Sliding-window step for documents longer than max_length."""
    scoring: str
    """Version tag of gate's scoring procedure."""
    tokenizer_hash: str
    """sha256 of the base tokenizer's files."""
    lm_eval: str | None = None
    """lm-eval version, when lm_eval suites ran."""
    seeds: dict = field(default_factory=dict)
    """lm-eval seeds (python, numpy, torch, few-shot sampling)."""


@dataclass
class Results:
    """The whole results.json document."""

    schema_version: int
    """Version of this schema; readers refuse versions they do not know."""
    gate_version: str
    """gate version that wrote it."""
    created_at: str
    """ISO-8601 UTC time of writing."""
    command: str
    """The command line that produced it."""
    versions: dict[str, str]
    """Versions of python, torch, transformers, peft."""
    settings: RunSettings
    """Scoring settings."""
    base: ModelResult
    """The base model and its scores."""
    checkpoints: list[ModelResult]
    """Every checkpoint found, valid or not, in scan order."""
    suites: list[SuiteInfo]
    """The suites scored."""
    warnings: list[str] = field(default_factory=list)
    """Non-fatal problems (scanner warnings and the like)."""
    config: str | None = None
    """The gate.yaml the run used (``gate check`` re-reads it unless told otherwise)."""

    @property
    def exit_code(self) -> int:
        """2 or 3 when a checkpoint was invalid or failed (as the run exited), else 0."""
        return max((c.error_code or 0 for c in self.checkpoints), default=0)

    def to_frame(self):
        """One pandas row per model x suite x item x metric, suite-level figures as columns (gate.table)."""
        from gate.table import to_frame

        return to_frame(self)

    @property
    def partial(self) -> bool:
        """True when any suite was capped by a limit: numbers are for a quick run only."""
        return any(s.limit is not None for s in self.suites)

    def to_json(self) -> dict:
        return {
            "partial": self.partial,
            "schema_version": self.schema_version,
            "gate_version": self.gate_version,
            "created_at": self.created_at,
            "command": self.command,
            "versions": self.versions,
            "settings": asdict(self.settings),
            "base": self.base.to_json(),
            "checkpoints": [c.to_json() for c in self.checkpoints],
            "suites": [asdict(s) for s in self.suites],
            "warnings": self.warnings,
            "config": self.config,
        }

    @classmethod
    def from_json(cls, obj: dict) -> Results:
        return cls(
            schema_version=obj["schema_version"],
            gate_version=obj["gate_version"],
            created_at=obj["created_at"],
            command=obj["command"],
            versions=obj["versions"],
            settings=RunSettings(**obj["settings"]),
            base=ModelResult.from_json(obj["base"]),
            checkpoints=[ModelResult.from_json(c) for c in obj["checkpoints"]],
            suites=[SuiteInfo.from_json(s) for s in obj["suites"]],
            warnings=obj.get("warnings", []),
            config=obj.get("config"),
        )  # "partial" is derived from the suites


def unpaired_items(reference: TaskScore, other: TaskScore) -> list[str]:
    """Ids of items whose prompt differs between two scores of one suite, or that only one has."""
    ref = {item.id: item.prompt_hash for item in reference.items}
    oth = {item.id: item.prompt_hash for item in other.items}
    return sorted(k for k in ref.keys() | oth.keys() if ref.get(k) != oth.get(k))


def version_conflicts(results: Results, release: ModelResult | None = None) -> list[str]:
    """Scores that would be compared although other library versions computed them.

    Every checkpoint's score (and the blessed release's) is compared with the base's on the same
    suite; the libraries both record must be at the same versions (peft is recorded for adapters
    only, as it does not touch the base). Scores that record no versions are not checked.
    """
    conflicts = []
    reference: dict[str, SuiteScore | TaskScore] = {**results.base.scores, **results.base.tasks}
    others = [c for c in results.checkpoints if c.status == "ok"] + ([release] if release is not None else [])
    for model in others:
        label = "the release" if model is release else model.name
        scores: dict[str, SuiteScore | TaskScore] = {**model.scores, **model.tasks}
        for suite, score in scores.items():
            base = reference.get(suite)
            if base is None or not base.libraries or not score.libraries:
                continue
            differ = sorted(k for k in base.libraries.keys() & score.libraries.keys() if base.libraries[k] != score.libraries[k])
            if differ:
                what = ", ".join(f"{k} {score.libraries[k]} vs {base.libraries[k]}" for k in differ)
                conflicts.append(f"{label} on {suite}: {what} (the base's)")
    return conflicts


def write_results(path: str | Path, results: Results) -> None:
    """Write results.json atomically."""
    write_json_atomic(path, results.to_json())


def write_json_atomic(path: str | Path, obj: dict) -> None:
    """Write JSON atomically: a reader never sees a half-written file, a crash leaves the old one.

    NaN and infinity are refused (they are not JSON, and a number that is not finite must be
    reported, never silently written).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=1, allow_nan=False)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise RunFailure(
            f"{path}: cannot be written ({err.strerror or err}); free disk space and run again: the previous file "
            "is intact and every score is kept in the results store"
        ) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_versioned_json(path: str | Path, version: int, missing: str, fix: str, shape: type | None = None) -> dict:
    """Read one of gate's JSON documents; refuse a missing, unreadable or other-version file.

    With ``shape`` (the document's dataclass), the document is also checked against it, field by
    field, before anything reads it: a wrong type or a missing field deep inside is refused with
    its field path (``checkpoints[2].scores.known-good.documents[4].nll: ...``), not met later as a
    crash.
    """
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GateError(f"{path}: {missing}") from None
    except (OSError, ValueError) as err:
        raise GateError(f"{path}: unreadable ({err}); {fix}") from None
    found = obj.get("schema_version") if isinstance(obj, dict) else None
    if found != version:
        raise GateError(f"{path}: schema_version {found!r} is not {version}; it was written by another gate version: {fix}")
    if shape is not None:
        check_shape(path, obj, shape, fix)
    return obj


@functools.cache
def _validator(shape: type):
    from pydantic import TypeAdapter

    return TypeAdapter(shape)


def check_shape(path: str | Path, obj: object, shape: type, fix: str) -> None:
    """Check a decoded document against its dataclass (pydantic, lax: 3.0 is an int, extra keys such
    as derived figures are ignored); the first problem, with its field path, as a GateError."""
    from pydantic import ValidationError

    try:
        _validator(shape).validate_python(obj)
    except ValidationError as err:
        first = err.errors()[0]
        where = field_path(first["loc"])
        got = "" if first["type"] == "missing" else f", got {_short(first.get('input'))}"
        more = f" (and {err.error_count() - 1} more problem(s))" if err.error_count() > 1 else ""
        raise GateError(f"{path}: {where}: {first['msg'].lower()}{got}{more}; {fix}") from None


def field_path(loc: tuple) -> str:
    """('checkpoints', 2, 'scores', 'known-good', 'nll') -> checkpoints[2].scores.known-good.nll"""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(the document)"


def _short(value: object) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def load_results(out: str | Path) -> Results:
    """The results of a run: ``out`` is its output folder (holding results.json) or the file itself."""
    out = Path(out)
    return read_results(out / "results.json" if out.is_dir() else out)


def read_results(path: str | Path) -> Results:
    """Read results.json; refuses unknown schema versions with a message saying what to do."""
    obj = read_versioned_json(
        path, SCHEMA_VERSION, "not found; run `gate run` first to produce it", "re-run `gate run` to rewrite it", Results
    )
    try:
        return Results.from_json(obj)
    except (KeyError, TypeError) as err:
        raise GateError(f"{path}: malformed ({err!r}); re-run `gate run` to rewrite it") from None

"""The run recipe, top to bottom: identify -> load base once -> score base -> for each checkpoint
attach adapter, score, detach -> full checkpoints alone -> assemble results.json from the store.

Only (model, suite) pairs missing from the results store are scored, so a re-run costs nothing
and a new checkpoint costs one checkpoint. Each pair is stored as soon as it is scored.
"""

from __future__ import annotations

import datetime as dt
import functools
import time
from dataclasses import dataclass, field
from pathlib import Path

import gate
from gate.errors import EXIT_INVALID_INPUT, EXIT_RUNTIME_FAILURE, CheckpointError, GateError, RunFailure
from gate.hashing import sha256_files
from gate.plan import RunRequest
from gate.progress import ProgressEvent, ProgressFn, no_progress
from gate.results import SCHEMA_VERSION, ModelResult, Results, RunSettings, SuiteInfo, SuiteScore, write_results
from gate.scan import Checkpoint
from gate.store import STORE_NAME, ResultsStore, ScoreIdentity, ScoreProvenance
from gate.runner import model as models
from gate.runner.perplexity import SCORING_VERSION, EncodedDocument, encode_suite, score_documents

RESULTS_NAME = "results.json"


@dataclass
class ModelPlan:
    """One model to be reported: its result record and, per suite, the store identity of its score."""

    result: ModelResult
    """The record that goes to results.json."""
    checkpoint: Checkpoint | None
    """The scanned checkpoint; None for the base."""
    identities: dict[str, ScoreIdentity] = field(default_factory=dict)
    """Suite name -> identity (store key) of this model's score on it."""


@dataclass
class RunOutcome:
    """What a run did: the results, where they are, and exactly what was computed."""

    results_path: Path
    """Where results.json is written."""
    results: Results | None = None
    """The results.json document (set once the run has assembled it)."""
    computed: list[tuple[str, str]] = field(default_factory=list)
    """(model, suite) pairs scored in this run."""
    reused: list[tuple[str, str]] = field(default_factory=list)
    """(model, suite) pairs taken from the results store."""
    problems: list[tuple[str, int]] = field(default_factory=list)
    """(message, exit code) for each checkpoint that is invalid or failed."""
    base_loads: int = 0
    """How many times the base model was loaded (0 when everything was in the store)."""

    @property
    def exit_code(self) -> int:
        return max((code for _, code in self.problems), default=0)


def run(request: RunRequest, progress: ProgressFn = no_progress) -> RunOutcome:
    """Score the base and every valid checkpoint on every suite; write results.json."""
    models.check_versions()
    store = ResultsStore(request.out_dir / STORE_NAME)
    with store:
        # 1. Identify the base, the settings and every (model, suite) score by content hashes.
        progress(ProgressEvent("stage", message=f"resolving base {request.base}"))
        base_dir = models.resolve_base(request.base, request.online)
        base_config = models.read_model_config(base_dir)
        base_hash = sha256_files(models.weight_files(base_dir, request.allow_pickle), base_dir, store.hash_cache)
        tokenizer_hash = sha256_files(models.tokenizer_files(base_dir), base_dir, store.hash_cache)
        tokenizer = models.load_tokenizer(base_dir, request.trust_remote_code)
        max_length, stride = models.choose_window(
            request.max_length, request.stride, models.context_size(base_config, tokenizer)
        )
        device = models.choose_device(request.device)
        dtype = models.choose_dtype(request.dtype, device)
        settings = RunSettings(
            device=str(device),
            dtype=str(dtype).removeprefix("torch."),
            batch_size=request.batch_size,
            max_length=max_length,
            stride=stride,
            scoring=SCORING_VERSION,
            tokenizer_hash=tokenizer_hash,
        )
        plans = _plan(request, base_hash, tokenizer_hash, settings, store)
        outcome = RunOutcome(results_path=request.out_dir / RESULTS_NAME)
        for plan in plans[1:]:
            if plan.result.status == "invalid":
                outcome.problems.append((plan.result.reason or plan.result.name, EXIT_INVALID_INPUT))

        todo = {
            (plan.result.name, suite)
            for plan in plans
            for suite, identity in plan.identities.items()
            if not store.has(identity.key)
        }
        if todo:
            # 2. Tokenize each suite once, before any model loads: bad data fails fast and cheap.
            progress(ProgressEvent("stage", message="tokenizing suites"))
            encoded = {suite.name: encode_suite(suite, tokenizer) for suite in request.suites}
            vocab_size = base_config.get("vocab_size") or len(tokenizer)
            scorer = _Scorer(request, store, settings, device, max_length, stride, vocab_size, progress, outcome)

            # 3. The base, loaded once; scored with no adapter attached.
            adapters = [p for p in plans[1:] if p.checkpoint.kind == "lora" and _needs_work(p, todo)]
            if _needs_work(plans[0], todo) or adapters:
                progress(ProgressEvent("stage", message=f"loading base model {base_dir}"))
                base_model = models.load_model(base_dir, device, dtype, request.trust_remote_code)
                outcome.base_loads += 1
                scorer.score_model(base_model, plans[0], encoded, tokenizer, todo)
                # 4. Each adapter in turn on the same base: attach, score, detach.
                _score_adapters(base_model, adapters, tokenizer, scorer, encoded, todo)
                del base_model
                models.free_memory()

            # 5. Full-weight checkpoints stand alone, each loaded by itself after the base is freed.
            full = [p for p in plans[1:] if p.checkpoint.kind == "full" and _needs_work(p, todo)]
            for plan in full:
                folder = Path(plan.checkpoint.path)
                load_full = functools.partial(
                    models.load_model, folder, device, dtype, request.trust_remote_code, CheckpointError
                )
                scorer.progress(ProgressEvent("stage", message=f"loading full checkpoint {plan.result.name}"))
                scorer.load_and_score(plan, load_full, models.free_memory, encoded, tokenizer, todo)

        # 6. Assemble results.json from the store: the single source of truth.
        results = _assemble(request, plans, settings, store)
    outcome.results = results
    computed = set(outcome.computed)
    outcome.reused = sorted((p.result.name, s) for p in plans for s in p.identities if (p.result.name, s) not in computed)
    write_results(outcome.results_path, results)
    return outcome


def _score_adapters(base_model, adapters, tokenizer, scorer: _Scorer, encoded, todo) -> None:
    slot = models.AdapterSlot(base_model)
    for plan in adapters:
        scorer.progress(ProgressEvent("stage", message=f"attaching adapter {plan.result.name}"))
        scorer.load_and_score(plan, lambda: slot.attach(plan.checkpoint), slot.detach, encoded, tokenizer, todo)


def _plan(
    request: RunRequest, base_hash: str, tokenizer_hash: str, settings: RunSettings, store: ResultsStore
) -> list[ModelPlan]:
    key_settings = {
        "dtype": settings.dtype,
        "max_length": settings.max_length,
        "stride": settings.stride,
        "scoring": settings.scoring,
    }
    base = ModelPlan(
        result=ModelResult(name="base", kind="base", path=request.base, weights_hash=base_hash), checkpoint=None
    )
    plans = [base]
    for ckpt in request.scan.checkpoints:
        result = ModelResult(
            name=ckpt.name,
            kind=ckpt.kind,
            path=ckpt.path,
            status=ckpt.status,
            reason=ckpt.reason,
            step=ckpt.step,
            weights_hash=ckpt.weights_hash,
            train_loss=ckpt.train_loss,
            eval_loss=ckpt.eval_loss,
            lora=None if ckpt.lora is None else vars(ckpt.lora),
        )
        plans.append(ModelPlan(result=result, checkpoint=ckpt))
    for plan in plans:
        if plan.result.status != "ok":
            continue
        is_full = plan.result.kind == "full"
        tok_hash = tokenizer_hash
        if is_full and plan.checkpoint.has_tokenizer:
            folder = Path(plan.checkpoint.path)
            tok_hash = sha256_files(models.tokenizer_files(folder), folder, store.hash_cache)
        for suite in request.suites:
            plan.identities[suite.name] = ScoreIdentity(
                base_hash=None if is_full else base_hash,
                model_hash=plan.result.weights_hash,
                tokenizer_hash=tok_hash,
                suite_identity=suite.identity,
                settings=key_settings,
            )
    return plans


def _needs_work(plan: ModelPlan, todo: set[tuple[str, str]]) -> bool:
    return any((plan.result.name, suite) in todo for suite in plan.identities)


def _fail(plan: ModelPlan, err: GateError, outcome: RunOutcome) -> None:
    plan.result.status = "error"
    plan.result.reason = str(err)
    code = EXIT_RUNTIME_FAILURE if isinstance(err, RunFailure) else EXIT_INVALID_INPUT
    outcome.problems.append((str(err), code))


@dataclass
class _Scorer:
    """Scores one loaded model on the suites it still needs and stores each score at once."""

    request: RunRequest
    store: ResultsStore
    settings: RunSettings
    device: object
    max_length: int
    stride: int
    vocab_size: int
    progress: ProgressFn
    outcome: RunOutcome

    def score_model(self, model, plan: ModelPlan, encoded: dict[str, list[EncodedDocument]], tokenizer, todo) -> None:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        for suite in self.request.suites:
            name = plan.result.name
            if (name, suite.name) not in todo:
                continue
            docs = encoded[suite.name]
            self.progress(ProgressEvent("start", model=name, suite=suite.name, total=len(docs)))
            began = time.perf_counter()
            try:
                records, used = score_documents(
                    model,
                    docs,
                    max_length=self.max_length,
                    stride=self.stride,
                    batch_size=self.request.batch_size,
                    device=self.device,
                    pad_id=pad_id,
                    on_progress=lambda done, total: self.progress(
                        ProgressEvent("advance", model=name, suite=suite.name, done=done, total=total)
                    ),
                )
            except RunFailure as err:
                if plan.checkpoint is None:
                    raise RunFailure(f"base model on suite {suite.name!r}: {err}") from None
                _fail(plan, RunFailure(f"{name} on suite {suite.name!r}: {err}"), self.outcome)
                return
            score = SuiteScore.from_documents(suite.name, records)
            provenance = ScoreProvenance(
                device=self.settings.device,
                batch_size=used,
                seconds=time.perf_counter() - began,
                gate_version=gate.__version__,
            )
            self.store.put(plan.identities[suite.name], score, provenance)
            self.outcome.computed.append((name, suite.name))
            self.progress(ProgressEvent("done", model=name, suite=suite.name, done=len(docs), total=len(docs)))

    def load_and_score(self, plan: ModelPlan, load, release, encoded, tokenizer, todo) -> None:
        """Check the tokenizer, load (an adapter or a full model), score, release; failures stay with the plan."""
        try:
            problem = models.tokenizer_problem(plan.checkpoint, tokenizer, self.vocab_size, self.request.trust_remote_code)
            if problem:
                raise CheckpointError(problem)
            model = load()
        except GateError as err:
            _fail(plan, err, self.outcome)
            return
        try:
            self.score_model(model, plan, encoded, tokenizer, todo)
        finally:
            model = None  # drop our reference before release() frees the memory
            release()


def _assemble(request: RunRequest, plans: list[ModelPlan], settings: RunSettings, store: ResultsStore) -> Results:
    for plan in plans:
        if plan.result.status != "ok":
            continue
        for suite, identity in plan.identities.items():
            score = store.get(identity.key)
            if score is not None:
                plan.result.scores[suite] = score
    suites = [
        SuiteInfo(
            name=s.name,
            type="perplexity",
            path=s.path,
            data_hash=s.data_hash,
            identity=s.identity,
            documents=len(s.documents),
            chat_template=s.chat_template,
        )
        for s in request.suites
    ]
    return Results(
        schema_version=SCHEMA_VERSION,
        gate_version=gate.__version__,
        created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        command=request.command,
        versions=models.library_versions(),
        settings=settings,
        base=plans[0].result,
        checkpoints=[p.result for p in plans[1:]],
        suites=suites,
        warnings=list(request.scan.warnings) + list(request.warnings),
    )

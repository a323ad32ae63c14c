"""The run recipe, top to bottom.

1. identify the base, the settings and every (model, suite) score by content hashes;
2. tokenize the perplexity suites and load the lm-eval tasks, before any model (bad data fails fast);
3. drift suites: the base's top-k reference is computed (and stored) first where a checkpoint needs it;
4. full-weight checkpoints stand alone: each is loaded by itself and scored on the perplexity suites;
5. the base, loaded once, is scored on every suite before any adapter touches it;
6. each adapter in turn on the same base: attach, score the perplexity suites, detach;
7. the funnel picks the checkpoints that get the (expensive) lm-eval suites;
8. those adapters are attached again in turn and scored on the lm-eval suites; the base is freed;
9. selected full checkpoints get the lm-eval suites;
10. results.json is assembled from the results store, the single source of truth.

Only (model, suite) pairs missing from the store are scored, so a re-run costs nothing and a new
checkpoint costs one checkpoint. Each pair is stored as soon as it is scored.
"""

from __future__ import annotations

import datetime as dt
import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

import gate
from gate.errors import (
    EXIT_INVALID_INPUT,
    EXIT_RUNTIME_FAILURE,
    CheckpointError,
    ConfigError,
    GateError,
    RunFailure,
    StoreError,
)
from gate.hashing import sha256_files
from gate.request import RunRequest, funnel_selection
from gate.progress import ProgressEvent, ProgressFn, no_progress
from gate.results import (
    SCHEMA_VERSION,
    ModelResult,
    Results,
    RunSettings,
    SuiteInfo,
    Drift,
    SuiteScore,
    unpaired_items,
    write_results,
)
from gate.runner import generate as generation
from gate.runner import harness
from gate.runner import model as models
from gate.runner.perplexity import SCORING_VERSION, DriftReference, DriftRun, encode_suite, score_documents
from gate.runner import perplexity as ppl
from gate.scan import Checkpoint
from gate.store import STORE_NAME, ResultsStore, ScoreIdentity, ScoreProvenance

RESULTS_NAME = "results.json"
WORK_DIR = ".gate"  # under the output folder: localized task YAMLs


@dataclass
class ModelPlan:
    """One model to be reported: its result record and, per suite, the store identity of its score."""

    result: ModelResult
    """The record that goes to results.json."""
    checkpoint: Checkpoint | None
    """The scanned checkpoint; None for the base."""
    identities: dict[str, ScoreIdentity] = field(default_factory=dict)
    """Suite name -> identity (store key) of this model's score on it."""

    @property
    def name(self) -> str:
        return self.result.name


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
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(model, suite) pairs not run on purpose (the funnel)."""
    problems: list[tuple[str, int]] = field(default_factory=list)
    """(message, exit code) for each checkpoint that is invalid or failed."""
    base_loads: int = 0
    """How many times the base model was loaded (0 when everything was in the store)."""
    rescoring: str | None = None
    """Why scores stored by an earlier run are computed again under this run's library versions
    (one line for the user), or None when none are."""

    @property
    def exit_code(self) -> int:
        return max((code for _, code in self.problems), default=0)


def run(request: RunRequest, progress: ProgressFn = no_progress) -> RunOutcome:
    """Score the base and every valid checkpoint on every suite; write results.json."""
    models.check_versions()
    with ResultsStore(request.out_dir / STORE_NAME) as store:
        # 1. Identify everything by content hashes.
        progress(ProgressEvent("stage", message=f"resolving base {request.base}"))
        base_dir = models.resolve_base(request.base, request.online)
        base_config = models.read_model_config(base_dir)
        models.check_saved_by(base_dir, base_config)
        base_hash = sha256_files(models.weight_files(base_dir, request.allow_pickle), base_dir, store.hash_cache)
        tokenizer_hash = sha256_files(models.tokenizer_files(base_dir), base_dir, store.hash_cache)
        # Loaded on first use: a run with every score stored never imports the tokenizer stack.
        tokenizer = functools.cache(lambda: models.load_tokenizer(base_dir, request.trust_remote_code))
        context = models.context_size(base_config, models.read_tokenizer_config(base_dir))
        max_length, stride = models.choose_window(request.max_length, request.stride, context)
        _check_generation_room(request, context)
        _check_drift_k(request, base_config)
        device = models.choose_device(request.device)
        dtype = models.choose_dtype(request.dtype, device)
        if request.task_specs:
            progress(ProgressEvent("stage", message="loading lm-eval tasks"))
        tasks = harness.prepare_tasks(request.task_specs, request.out_dir / WORK_DIR) if request.task_specs else []
        settings = RunSettings(
            device=str(device),
            dtype=str(dtype).removeprefix("torch."),
            batch_size=request.batch_size,
            max_length=max_length,
            stride=stride,
            scoring=SCORING_VERSION,
            tokenizer_hash=tokenizer_hash,
            lm_eval=harness.lm_eval_version() if tasks else None,
            seeds=dict(harness.SEEDS) if tasks else {},
        )
        plans = _plan(request, tasks, base_hash, tokenizer_hash, settings, store, request.versions or models.score_versions())
        outcome = RunOutcome(results_path=request.out_dir / RESULTS_NAME)
        for plan in plans[1:]:
            if plan.result.status == "invalid":
                plan.result.error_code = EXIT_INVALID_INPUT
                outcome.problems.append((plan.result.reason or plan.name, EXIT_INVALID_INPUT))
            elif plan.name in request.failures:
                reason, code = request.failures[plan.name]
                plan.result.status, plan.result.reason, plan.result.error_code = "error", reason, code
                outcome.problems.append((reason, code))
        todo = {(p.name, s) for p in plans for s, ident in p.identities.items() if not store.has(ident.key)}
        outcome.rescoring = _rescoring(plans, todo, store)
        # Generate suites run with the perplexity suites, on every checkpoint (no funnel).
        perplexity_suites = [s.name for s in request.suites] + [s.name for s in request.probe_suites]
        task_suites = [t.spec.name for t in tasks]
        base_plan, checkpoints = plans[0], [p for p in plans[1:] if p.result.status == "ok"]
        adapters = [p for p in checkpoints if p.checkpoint.kind == "lora"]
        fulls = [p for p in checkpoints if p.checkpoint.kind == "full"]

        # 2. Tokenize perplexity suites once, for all models (only those this run may compute).
        needed = {s for m, s in todo if _allowed(request, m, s)}
        if needed:
            tokenizer()  # a broken base tokenizer is the base's problem: report it before any checkpoint
        progress(ProgressEvent("stage", message="tokenizing suites"))
        encoded = {s.name: encode_suite(s, tokenizer()) for s in request.suites if s.name in needed}
        probes = {
            s.name: (s, generation.encode_probes(s, tokenizer(), context))
            for s in request.probe_suites
            if s.name in needed
        }
        scorer = _Scorer(
            request=request,
            store=store,
            settings=settings,
            device=device,
            dtype=dtype,
            max_length=max_length,
            stride=stride,
            vocab_size=base_config.get("vocab_size"),
            load_tokenizer=tokenizer,
            encoded=encoded,
            tasks={t.spec.name: t for t in tasks},
            probes=probes,
            todo=todo,
            progress=progress,
            outcome=outcome,
        )

        base = _LoadedBase(
            lambda: models.load_model(base_dir, device, dtype, request.trust_remote_code),
            outcome,
            key=(str(base_dir), base_hash, str(device), str(dtype)) if request.keep_base_loaded else None,
        )

        # 3. Drift references: the base's top-k on every drift suite that a checkpoint of this run
        # still needs (a worker or shard whose share lacks the base computes them for itself).
        pending = scorer.missing_references(base_plan, checkpoints)
        if pending:
            scorer.score(base.model(), base_plan, pending, force=True)
            if any(scorer.needs(p, perplexity_suites) for p in fulls):
                base.release()  # a full checkpoint stands alone in memory

        # 4. Full-weight checkpoints, each alone, before the base takes the memory.
        for plan in fulls:
            scorer.full_checkpoint(plan, perplexity_suites)

        # 5. The base, loaded once, on every suite, before any adapter is injected into it.
        if scorer.needs(base_plan, perplexity_suites + task_suites):
            scorer.score(base.model(), base_plan, perplexity_suites + task_suites)

        # 6. Each adapter in turn on the same base: attach, score, detach.
        for plan in adapters:
            scorer.adapter(base, plan, perplexity_suites)

        # 7. The funnel: lm-eval suites only for the best checkpoints.
        selected = _funnel(request, checkpoints, task_suites, store, scorer)

        # 8. lm-eval suites on the selected adapters; then the base is freed.
        for plan in adapters:
            if plan.name in selected:
                scorer.adapter(base, plan, task_suites)
        base.release()

        # 9. lm-eval suites on the selected full checkpoints.
        for plan in fulls:
            if plan.name in selected:
                scorer.full_checkpoint(plan, task_suites)

        # 10. Assemble results.json from the store.
        results = _assemble(request, plans, tasks, settings, store, outcome)
    outcome.results = results
    computed = set(outcome.computed)
    outcome.reused = sorted(
        (p.name, s)
        for p in plans
        for s in p.identities
        if (p.name, s) not in computed and s not in p.result.skipped and (s in p.result.scores or s in p.result.tasks)
    )
    outcome.skipped = sorted((p.name, s) for p in plans for s in p.result.skipped)
    write_results(outcome.results_path, results)
    return outcome


_KEPT_BASES: dict[tuple, tuple] = {}  # a long-lived worker's base and adapter slot, by identity


class _LoadedBase:
    """The base model, loaded on first use (never when everything is stored), and its adapter slot.

    With ``key`` (a long-lived worker), the model and its slot stay in this process for the next
    run. A kept base is only ever used with no adapter active, so it scores exactly as a fresh one.
    """

    def __init__(self, load, outcome: RunOutcome, key: tuple | None = None):
        self._load = load
        self._outcome = outcome
        self._key = key
        self._model = None
        self.slot: models.AdapterSlot | None = None
        if key is not None and key in _KEPT_BASES:
            self._model, self.slot = _KEPT_BASES[key]

    def model(self):
        if self._model is None:
            self._model = self._load()
            self._outcome.base_loads += 1
            self.slot = models.AdapterSlot(self._model)
            if self._key is not None:
                _KEPT_BASES.clear()  # one base per worker
                _KEPT_BASES[self._key] = (self._model, self.slot)
        return self._model

    def release(self) -> None:
        if self._key is None:
            self._model = self.slot = None
            models.free_memory()


def _plan(
    request, tasks, base_hash, tokenizer_hash, settings: RunSettings, store: ResultsStore, versions: dict[str, str]
) -> list[ModelPlan]:
    key_settings = {
        "dtype": settings.dtype,
        "max_length": settings.max_length,
        "stride": settings.stride,
        "scoring": settings.scoring,
    }
    suite_identities = {s.name: s.identity for s in request.suites}
    suite_identities.update({s.name: s.identity for s in request.probe_suites})
    suite_identities.update({t.spec.name: t.identity for t in tasks})
    task_names = {t.spec.name for t in tasks}
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
    drift_suites = {s.name for s in request.suites if s.drift_k is not None}
    for plan in plans:
        if plan.result.status != "ok":
            continue
        is_full = plan.result.kind == "full"
        tok_hash = tokenizer_hash
        if is_full and plan.checkpoint.has_tokenizer:
            folder = Path(plan.checkpoint.path)
            tok_hash = sha256_files(models.tokenizer_files(folder), folder, store.hash_cache)
        # peft computes only adapters' numbers, lm-eval only its suites': a version of either
        # changes (and rescores) only those.
        model_versions = {k: v for k, v in versions.items() if k != "peft" or plan.result.kind == "lora"}
        for name, identity in suite_identities.items():
            numbers_settings = key_settings
            if name in drift_suites and plan is not base:
                # A checkpoint's drift is computed against the base's stored top-k: its key names that score.
                numbers_settings = {**key_settings, "drift_reference": base.identities[name].key}
            plan.identities[name] = ScoreIdentity(
                base_hash=None if is_full else base_hash,
                model_hash=plan.result.weights_hash,
                tokenizer_hash=tok_hash,
                suite_identity=identity,
                settings=numbers_settings,
                versions={**model_versions, **({"lm_eval": settings.lm_eval} if name in task_names else {})},
            )
    return plans


def _rescoring(plans: list[ModelPlan], todo: set, store: ResultsStore) -> str | None:
    """One line saying which stored scores are computed again because library versions changed."""
    changes: dict[str, set[str]] = {}
    count = 0
    for plan in plans:
        for suite, identity in plan.identities.items():
            if (plan.name, suite) not in todo:
                continue
            stored = store.other_versions(identity)
            if not stored:
                continue
            count += 1
            for old in stored:
                for package, new in identity.versions.items():
                    if old.get(package) != new:
                        changes.setdefault(package, set()).add(f"{old.get(package, 'unrecorded')} -> {new}")
    if not count:
        return None
    what = ", ".join(f"{package} {' / '.join(sorted(c))}" for package, c in sorted(changes.items()))
    return (
        f"rescoring {count} model x suite score(s) stored under other library versions ({what}): "
        "scores computed under other versions are never compared"
    )


def _funnel(request: RunRequest, checkpoints: list[ModelPlan], task_suites, store, scorer: _Scorer) -> set[str]:
    """Names of the checkpoints that get the lm-eval suites; the others are marked skipped."""
    everyone = {p.name for p in checkpoints}
    funnel = request.funnel
    if funnel is None or not task_suites:
        return everyone
    candidates = []
    for plan in checkpoints:
        identity = plan.identities.get(funnel.suite)
        score = store.get(identity.key) if identity and plan.result.status == "ok" else None
        candidates.append((plan.name, plan.result.step, score))  # failed on the ranking suite: never selected
    selected = funnel_selection(funnel, candidates)
    for plan in checkpoints:
        if plan.name in selected:
            continue
        for suite in task_suites:
            if (plan.name, suite) in scorer.todo:
                scorer.todo.discard((plan.name, suite))
                plan.result.skipped[suite] = (
                    f"funnel: not among the {funnel.top_k} best by {funnel.suite}.{funnel.metric}"
                )
    return selected


def _check_drift_k(request: RunRequest, base_config: dict) -> None:
    """k of a drift suite cannot exceed the vocabulary: refuse it before any model loads."""
    vocab = base_config.get("vocab_size")
    capped = [key for key in ppl.SOFTCAP_KEYS if base_config.get(key) not in (None, 1, 1.0)]
    for suite in request.suites:
        where = request.config_path or "gate.yaml"
        if suite.drift_k is not None and vocab is not None and suite.drift_k > vocab:
            raise ConfigError(
                where,
                [f"suite {suite.name!r}: drift_k {suite.drift_k} exceeds the base's vocabulary ({vocab} tokens); lower drift_k"],
            )
        if suite.drift_k == ppl.DRIFT_EXACT and capped:
            raise ConfigError(where, [_not_linear_head(suite.name, f"its config.json sets {capped[0]}")])


def _not_linear_head(suite: str, why: str) -> str:
    return (
        f"suite {suite!r}: exact drift recomputes the base's logits as lm_head(hidden state), and the base's logits are "
        f"not that ({why}: soft-capped or scaled logits); set `drift_k: 32` on the suite (top-k drift, a lower bound)"
    )


def _allowed(request: RunRequest, model: str, suite: str) -> bool:
    """Whether this run may compute the pair (``only`` is a distributed worker's or shard's share)."""
    return request.only is None or suite in request.only.get(model, ())


def _fail(plan: ModelPlan, err: GateError, outcome: RunOutcome) -> None:
    plan.result.status = "error"
    plan.result.reason = str(err)
    code = EXIT_RUNTIME_FAILURE if isinstance(err, RunFailure) else EXIT_INVALID_INPUT
    plan.result.error_code = code
    outcome.problems.append((str(err), code))


@dataclass
class _Scorer:
    """Scores loaded models on the suites they still need and stores each score at once."""

    request: RunRequest
    store: ResultsStore
    settings: RunSettings
    device: object
    dtype: object
    max_length: int
    stride: int
    vocab_size: int | None
    load_tokenizer: Callable[[], object]
    encoded: dict
    tasks: dict
    probes: dict
    todo: set
    progress: ProgressFn
    outcome: RunOutcome

    @property
    def tokenizer(self):
        return self.load_tokenizer()

    references: dict = field(default_factory=dict)
    """Suite -> the base's drift reference (per document), read from the store once."""

    def needs(self, plan: ModelPlan, suites: list[str]) -> bool:
        return plan.result.status == "ok" and any(self._due(plan.name, s) for s in suites)

    def missing_references(self, base: ModelPlan, checkpoints: list[ModelPlan]) -> list[str]:
        """Drift suites that a checkpoint of this run still needs and whose base reference is not stored."""
        return [
            s.name
            for s in self.request.suites
            if s.drift_k is not None
            and any(self._due(p.name, s.name) for p in checkpoints)
            and not self.store.has(base.identities[s.name].key)
        ]

    def _due(self, model: str, suite: str) -> bool:
        """Missing from the store, and this run's to compute."""
        return (model, suite) in self.todo and _allowed(self.request, model, suite)

    def adapter(self, base: _LoadedBase, plan: ModelPlan, suites: list[str]) -> None:
        if not self.needs(plan, suites):
            return
        base.model()
        self.progress(ProgressEvent("stage", message=f"attaching adapter {plan.name}"))
        self._load_and_score(plan, lambda: base.slot.attach(plan.checkpoint), base.slot.detach, suites)

    def full_checkpoint(self, plan: ModelPlan, suites: list[str]) -> None:
        if not self.needs(plan, suites):
            return
        load = functools.partial(
            models.load_model,
            Path(plan.checkpoint.path),
            self.device,
            self.dtype,
            self.request.trust_remote_code,
            CheckpointError,
        )
        self.progress(ProgressEvent("stage", message=f"loading full checkpoint {plan.name}"))
        self._load_and_score(plan, load, models.free_memory, suites)

    def _load_and_score(self, plan: ModelPlan, load, release, suites: list[str]) -> None:
        """Check the tokenizer, load (an adapter or a full model), score, release; failures stay with the plan."""
        try:
            problem = models.tokenizer_problem(
                plan.checkpoint, self.tokenizer, self.vocab_size or len(self.tokenizer), self.request.trust_remote_code
            )
            if problem:
                raise CheckpointError(problem)
            self._check_drift_vocabulary(plan, suites)
            model = load()
        except GateError as err:
            _fail(plan, err, self.outcome)
            return
        try:
            self.score(model, plan, suites)
        finally:
            model = None  # drop our reference before release() frees the memory
            release()

    def score(self, model, plan: ModelPlan, suites: list[str], force: bool = False) -> None:
        """Score the suites still due (``force``: due even outside this run's share: drift references)."""
        for suite in suites:
            due = (plan.name, suite) in self.todo if force else self._due(plan.name, suite)
            if not due or plan.result.status != "ok":
                continue
            try:
                if suite in self.tasks:
                    self._task(model, plan, suite)
                elif suite in self.probes:
                    self._generate(model, plan, suite)
                else:
                    self._perplexity(model, plan, suite)
            except StoreError:
                raise  # the disk, not this checkpoint: stop the run; what is stored stays stored
            except RunFailure as err:
                if plan.checkpoint is None:
                    raise RunFailure(f"base model on suite {suite!r}: {err}") from None
                _fail(plan, RunFailure(f"{plan.name} on suite {suite!r}: {err}"), self.outcome)
                return
            self.todo.discard((plan.name, suite))
            self.outcome.computed.append((plan.name, suite))

    def _provenance(self, began: float, batch_size: int) -> ScoreProvenance:
        return ScoreProvenance(
            device=self.settings.device,
            batch_size=batch_size,
            seconds=time.perf_counter() - began,
            gate_version=gate.__version__,
        )

    def _check_drift_vocabulary(self, plan: ModelPlan, suites: list[str]) -> None:
        """Drift compares next-token distributions token id by token id: the vocabularies must be one."""
        drift = [s.name for s in self.request.suites if s.drift_k is not None and s.name in suites]
        if not drift or plan.checkpoint.kind != "full":
            return  # an adapter's vocabulary is the base's (tokenizer_problem refuses resized embeddings)
        own = models.read_model_config(Path(plan.checkpoint.path)).get("vocab_size")
        if own is not None and self.vocab_size is not None and own != self.vocab_size:
            raise CheckpointError(
                f"{plan.name}: its vocabulary has {own} tokens but the base's has {self.vocab_size}; drift (suite "
                f"{drift[0]!r}) compares the two next-token distributions token by token, so it cannot be measured: "
                "turn drift off for this run or evaluate a checkpoint with the base's vocabulary"
            )

    def _reference(self, base_key: str, suite: str) -> list[DriftReference]:
        if suite not in self.references:
            stored = self.store.get_reference(base_key)
            if stored is None:
                raise RunFailure(
                    f"the base's drift reference for suite {suite!r} is not in the results store; run the same command again"
                )
            self.references[suite] = [ppl.from_stored(r) for r in stored]
        return self.references[suite]

    def _perplexity(self, model, plan: ModelPlan, suite: str) -> None:
        docs = self.encoded[suite]
        name = plan.name
        k = next(s.drift_k for s in self.request.suites if s.name == suite)
        drift, reference_key = None, None
        if k is not None and plan.checkpoint is None:
            drift = DriftRun(k)
        elif k is not None:
            reference_key = plan.identities[suite].settings["drift_reference"]
            head = None
            if k == ppl.DRIFT_EXACT and plan.checkpoint.kind == "full":
                # A full checkpoint stands alone in memory: the base's lm_head comes from its files.
                base_dir = models.resolve_base(self.request.base, self.request.online)
                head = ppl.output_head_from_files(base_dir, self.dtype, self.device, self.request.trust_remote_code)
            elif k == ppl.DRIFT_EXACT:
                head = ppl.base_output_head(model)  # an adapter on the loaded base: the base's own module
            drift = DriftRun(k, reference=self._reference(reference_key, suite), tokenizer=self.tokenizer, head=head)
        self.progress(ProgressEvent("start", model=name, suite=suite, total=len(docs)))
        began = time.perf_counter()
        try:
            records, used = score_documents(
                model,
                docs,
                max_length=self.max_length,
                stride=self.stride,
                batch_size=self.request.batch_size,
                device=self.device,
                pad_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0,
                on_progress=lambda done, total: self.progress(
                    ProgressEvent("advance", model=name, suite=suite, done=done, total=total)
                ),
                drift=drift,
            )
        except ppl.NotLinearHead:
            where = self.request.config_path or "gate.yaml"
            raise ConfigError(where, [_not_linear_head(suite, "its first batch's logits differ from lm_head(hidden)")]) from None
        summary, reference = None, None
        if drift is not None and drift.capturing:
            reference = [ppl.to_stored(r, k) for r in drift.captured]
            self.references[suite] = drift.captured
        elif drift is not None:
            summary = Drift(k=k, kl_p99=float(np.percentile(np.concatenate(drift.token_kl), 99)))
        score = SuiteScore.from_documents(suite, records, summary)
        self.store.put(plan.identities[suite], score, self._provenance(began, used), reference, reference_key)
        self.progress(ProgressEvent("done", model=name, suite=suite, done=len(docs), total=len(docs)))

    def _generate(self, model, plan: ModelPlan, suite: str) -> None:
        probe_suite, encoded = self.probes[suite]
        name = plan.name
        self.progress(ProgressEvent("start", model=name, suite=suite, total=len(encoded)))
        began = time.perf_counter()
        stops = generation.stop_token_ids(self.tokenizer, model)
        outputs, used = generation.generate(
            model,
            encoded,
            probe_suite,
            self.tokenizer,
            batch_size=self.request.batch_size,
            device=self.device,
            stops=stops,
            on_progress=lambda done, total: self.progress(
                ProgressEvent("advance", model=name, suite=suite, done=done, total=total)
            ),
        )
        score = generation.probe_score(probe_suite, encoded, outputs, self.tokenizer, stops, probe_suite.metric)
        self.store.put_task(plan.identities[suite], score, self._provenance(began, used))
        self.progress(ProgressEvent("done", model=name, suite=suite, done=len(encoded), total=len(encoded)))

    def _task(self, model, plan: ModelPlan, suite: str) -> None:
        task = self.tasks[suite]
        self.progress(ProgressEvent("start", model=plan.name, suite=suite, total=task.n_documents))
        began = time.perf_counter()
        score = harness.evaluate(
            model,
            self.tokenizer,
            task,
            batch_size=self.request.batch_size,
            device=self.device,
            max_length=self.max_length,
        )
        self.store.put_task(plan.identities[suite], score, self._provenance(began, self.request.batch_size))
        self.progress(ProgressEvent("done", model=plan.name, suite=suite, done=task.n_documents, total=task.n_documents))


def _record_groups(request, plans: list[ModelPlan], tasks) -> None:
    """Give the base's records the fields gates cluster by (JSONL ``meta``, lm-eval document fields)."""
    gates = request.policy.gates if request.policy is not None else []
    wanted: dict[str, set[str]] = {}
    for g in gates:
        if g.cluster:
            wanted.setdefault(g.suite, set()).add(g.cluster)
    base = next((p.result for p in plans if p.result.kind == "base"), None)
    if base is None or not wanted:
        return
    meta = {s.name: {d.id: d.meta for d in s.documents} for s in request.suites}
    fields = {t.spec.name: t.doc_fields for t in tasks}
    for suite, names in wanted.items():
        records = base.scores[suite].documents if suite in base.scores else (base.tasks[suite].items if suite in base.tasks else [])
        source = meta.get(suite) or fields.get(suite) or {}
        for record in records:
            values = source.get(record.id, {})
            record.groups = {n: values[n] for n in sorted(names) if n in values}


def _assemble(request, plans: list[ModelPlan], tasks, settings, store: ResultsStore, outcome: RunOutcome) -> Results:
    semantics = {t.spec.name: t for t in tasks}
    for plan in plans:
        if plan.result.status != "ok":
            continue
        for suite, identity in plan.identities.items():
            if suite in plan.result.skipped:
                continue
            score = store.get(identity.key)
            if score is not None:
                plan.result.scores[suite] = score
            task_score = store.get_task(identity.key)
            if task_score is not None:
                # Scores stored before gate recorded metric semantics get them from the task itself.
                prepared = semantics.get(suite)
                if prepared is not None:
                    task_score.higher_is_better = task_score.higher_is_better or dict(prepared.higher_is_better)
                    task_score.aggregation = task_score.aggregation or dict(prepared.aggregation)
                plan.result.tasks[suite] = task_score
    _check_pairing(plans, outcome)
    _record_groups(request, plans, tasks)
    suites = [
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
    ] + [
        SuiteInfo(
            name=t.spec.name,
            type="lm_eval",
            path=t.spec.task,
            data_hash=t.docs_hash,
            identity=t.identity,
            documents=t.n_documents,
            chat_template=t.spec.use_chat_template,
            metric=t.metric,
            limit=t.spec.limit,
            num_fewshot=t.spec.num_fewshot,
            versions=t.versions,
            generation=harness.generation_settings(t.spec),
        )
        for t in tasks
    ] + [
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
            generation=generation.suite_record(s),
        )
        for s in request.probe_suites
    ]
    return Results(
        schema_version=SCHEMA_VERSION,
        gate_version=gate.__version__,
        created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        command=request.command,
        versions={**models.library_versions(), **({"lm_eval": settings.lm_eval} if settings.lm_eval else {})},
        settings=settings,
        base=plans[0].result,
        checkpoints=[p.result for p in plans[1:]],
        suites=suites,
        warnings=list(request.scan.warnings) + list(request.warnings),
        config=request.config_path,
    )


def _check_generation_room(request: RunRequest, context: int | None) -> None:
    """max_new_tokens must leave room for a prompt in the model's context (before any model loads)."""
    if context is None:
        return
    problems = [
        f"line {s.config_line}: " * (s.config_line is not None)
        + f"suite {s.name!r}: max_new_tokens {s.max_new_tokens} is not below the model's context of {context} tokens; "
        f"lower max_new_tokens (e.g. {min(128, context // 2)})"
        for s in request.probe_suites
        if s.max_new_tokens >= context
    ]
    if problems:
        raise ConfigError(request.config_path, problems)


def _check_pairing(plans: list[ModelPlan], outcome: RunOutcome) -> None:
    """Base and checkpoint must have seen the same prompts, item by item, before they are compared."""
    base = plans[0].result
    for plan in plans[1:]:
        for suite, score in list(plan.result.tasks.items()):
            reference = base.tasks.get(suite)
            if reference is None:
                continue
            mismatched = unpaired_items(reference, score)
            if mismatched:
                del plan.result.tasks[suite]
                message = (
                    f"{plan.name} on suite {suite!r}: {len(mismatched)} item(s) saw other prompts than the base "
                    f"(first: {mismatched[0]}); its scores are dropped: delete the output folder's gate.sqlite and re-run"
                )
                _fail(plan, RunFailure(message), outcome)

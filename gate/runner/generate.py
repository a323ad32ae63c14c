"""Greedy generation for `generate` suites: prompts rendered once, batched with left padding and
the KV cache, sorted by prompt length; each row stops at EOS or the chat template's end-of-turn.

The loaded model (the base, or the base with one adapter active) generates; gate.probes turns
each output into per-item metrics. Outputs are kept verbatim (special tokens the model wrote
included, the stop token itself excluded), as valid UTF-8.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from gate.errors import SuiteError
from gate.probes import ProbeSuite, aggregate, clean_text, item_metrics
from gate.results import ItemScore, TaskScore
from gate.runner.perplexity import context_token_id, run_batches

GENERATION_VERSION = "greedy-1"  # bump when what is generated for the same settings changes


@dataclass
class EncodedProbe:
    """One probe's prompt, tokenized once for every model."""

    id: str
    """The probe's id."""
    input_ids: list[int]
    """The rendered prompt's tokens (chat template, generation prompt included)."""
    excerpt: str
    """The request, for reports."""


def render_prompt(probe, suite: ProbeSuite, tokenizer) -> tuple[str, bool]:
    """(prompt text, whether it went through the chat template)."""
    messages = list(probe.messages or [{"role": "user", "content": probe.prompt}])
    if suite.system is not None and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": suite.system}, *messages]
    if suite.chat_template and tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), True
    if probe.messages is not None:
        raise SuiteError(
            f'{suite.path}: line {probe.line} uses "messages" but '
            + ("the tokenizer has no chat template" if suite.chat_template else "chat_template is off for this suite")
            + '; write a plain "prompt" instead, or turn chat_template on'
        )
    return "\n\n".join([m["content"] for m in messages]), False


def encode_probes(suite: ProbeSuite, tokenizer, context: int | None) -> list[EncodedProbe]:
    """Tokenize every prompt once; refuse prompts that leave no room for max_new_tokens."""
    out = []
    for probe in suite.probes:
        text, templated = render_prompt(probe, suite, tokenizer)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not templated:
            ids = [context_token_id(tokenizer), *ids]  # plain text starts after BOS, as in training
        if context is not None and len(ids) + suite.max_new_tokens > context:
            raise SuiteError(
                f"{suite.path}: line {probe.line} (probe {probe.id!r}): its prompt is {len(ids)} tokens, and with "
                f"max_new_tokens {suite.max_new_tokens} it exceeds the model's context of {context} tokens; "
                "shorten the prompt or lower max_new_tokens in gate.yaml"
            )
        out.append(EncodedProbe(id=probe.id, input_ids=ids, excerpt=probe.excerpt()))
    return out


def stop_token_ids(tokenizer, model_config=None) -> list[int]:
    """EOS (the tokenizer's and the model's generation config's) and the chat template's end-of-turn token."""
    stops: list[int] = []

    def add(value) -> None:
        for token in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(token, int) and token not in stops:
                stops.append(token)

    add(tokenizer.eos_token_id)
    add(getattr(getattr(model_config, "generation_config", None), "eos_token_id", None))
    if tokenizer.chat_template:
        add(end_of_turn_id(tokenizer))
    return stops


def end_of_turn_id(tokenizer) -> int | None:
    """The special token the chat template writes right after an assistant turn (e.g. <|im_end|>)."""
    marker = "gate-end-of-turn-marker"
    try:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hello"}, {"role": "assistant", "content": marker}], tokenize=False
        )
    except Exception:  # noqa: BLE001 - a template that cannot render a turn has no end-of-turn to find
        return None
    tail = rendered.split(marker, 1)[1] if marker in rendered else ""
    ids = tokenizer(tail.lstrip(" "), add_special_tokens=False)["input_ids"] if tail else []
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return next((i for i in ids if i in special), None)


def generation_config(suite: ProbeSuite, stops: list[int], pad_id: int):
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=suite.max_new_tokens,
        eos_token_id=stops,
        pad_token_id=pad_id,
        use_cache=True,
    )


def suite_record(suite: ProbeSuite) -> dict:
    """The generation settings of a suite as gate.yaml asked for them (results.json's suites)."""
    return {
        "decoding": "greedy",
        "do_sample": False,
        "num_beams": 1,
        "max_new_tokens": suite.max_new_tokens,
        "system": suite.system,
        "chat_template": suite.chat_template,
        "version": GENERATION_VERSION,
    }


def generation_record(suite: ProbeSuite, tokenizer, stops: list[int]) -> dict:
    """The generation settings as used for one model (results.json's per-model task score)."""
    return {
        **suite_record(suite),
        "chat_template": bool(suite.chat_template and tokenizer.chat_template),
        "stop_tokens": {str(i): tokenizer.convert_ids_to_tokens(i) for i in stops},
        "padding": "left",
        "kv_cache": True,
    }


@torch.inference_mode()
def _generate_batch(model, batch: list[EncodedProbe], device, pad_id: int, config, stops: list[int]) -> list[tuple[list[int], bool]]:
    """One left-padded batch through model.generate; per row, the new tokens up to the stop and whether it stopped."""
    width = max(len(p.input_ids) for p in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    for row, probe in enumerate(batch):
        # Left padding: every prompt ends at the same column, so new tokens line up across rows.
        ids[row, width - len(probe.input_ids) :] = torch.tensor(probe.input_ids)
        attention[row, width - len(probe.input_ids) :] = 1
    out = model.generate(input_ids=ids.to(device), attention_mask=attention.to(device), generation_config=config)
    rows = []
    stop_set = set(stops)
    for row in out[:, width:].tolist():
        cut = next((k for k, token in enumerate(row) if token in stop_set), None)
        rows.append((row if cut is None else row[:cut], cut is not None))
    return rows


def generate(
    model,
    encoded: list[EncodedProbe],
    suite: ProbeSuite,
    tokenizer,
    *,
    batch_size: int,
    device,
    stops: list[int],
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[list[tuple[list[int], bool]], int]:
    """New tokens and ended flag per probe (in suite order); returns them and the batch size used."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0] if stops else 0
    config = generation_config(suite, stops, pad_id)
    # Longest first: similar lengths share a batch (little padding), and an out-of-memory error
    # shows up on the first batch rather than after most of the work.
    order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i].input_ids), i))
    ordered = [encoded[i] for i in order]
    results: list = []

    def consume(batch, values) -> None:
        results.extend(values)
        if on_progress:
            on_progress(len(results), len(ordered))

    used = run_batches(
        model,
        ordered,
        batch_size,
        device,
        pad_id,
        consume,
        forward=lambda m, batch, dev, pad: _generate_batch(m, batch, dev, pad, config, stops),
    )
    outputs: list = [None] * len(encoded)
    for position, value in zip(order, results):
        outputs[position] = value
    return outputs, used


def probe_score(
    suite: ProbeSuite, encoded: list[EncodedProbe], outputs, tokenizer, stops: list[int], metric: str | None = None
) -> TaskScore:
    """Generated tokens -> verbatim texts, checks and per-item metrics, as a TaskScore."""
    items = []
    for probe, enc, (tokens, ended) in zip(suite.probes, encoded, outputs):
        text = clean_text(tokenizer.decode(tokens, skip_special_tokens=False, clean_up_tokenization_spaces=False))
        values = item_metrics(text, ended, probe.checks, suite.detectors)
        items.append(
            ItemScore(
                id=probe.id,
                prompt_hash=_prompt_hash(enc.input_ids),
                values=values,
                excerpt=enc.excerpt,
                output={"text": text, "tokens": len(tokens), "ended": ended},
            )
        )
    metrics = aggregate([i.values for i in items])
    return TaskScore(
        suite=suite.name,
        task=suite.path,
        metric=metric or ("ok" if "ok" in metrics else "words"),
        metrics=metrics,
        items=items,
        limit=suite.limit,
        generation=generation_record(suite, tokenizer, stops),
    )


def _prompt_hash(ids: list[int]) -> str:
    import hashlib

    return hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()

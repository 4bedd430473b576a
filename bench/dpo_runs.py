"""Labeled DPO runs for the early-warning benchmark, driven through TRL and through Lightning.

A run is one (subject, task, condition, seed, framework). It trains for real with the framework's
own loop (TRL's ``DPOTrainer`` with its ``logging_steps``, or the Lightning recipe's
``DPOModule``), with the spinal callback attached and never stopping, and records:

- every input the callback's ``RampMonitor`` received, in order (the reference trace, each
  probe's ``DepthTrace``, each set of logged scalars), so any monitor configuration can be
  replayed on the run without training it again;
- outcomes every ``eval_every`` steps: held-out preference accuracy (the implicit reward margin
  above 0) and the perplexity of held-out neutral text relative to the reference's.

Subjects are tiny random-initialised architectures first pretrained as language models on the
tasks' domain (``preference_data.neutral_sentences`` and task prompts with either reply), so that
DPO starts from a base with a language to keep and a preference still to learn; the demo's
random-initialised Llama; and the real SmolLM2-135M-Instruct (``recipes/smollm2.py``).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from spinal_callback.demos.preference_data import (
    TASKS,
    TOKENIZER_VOCAB_SIZE,
    neutral_sentences,
    tokenizer_corpus,
)
from spinal_callback.demos.tiny import build_tiny_model, build_tiny_tokenizer
from spinal_callback.monitor.ramp_monitor import RampMonitor
from spinal_callback.probe.texts import DEFAULT_NEUTRAL_TEXTS
from spinal_callback.tools.pairs import collate_pairs, reply_logp_shifts
from spinal_callback.training import recovery

RESULTS = Path("bench/results/early_warning")
EVAL_PAIRS = 64
CHAT_EVAL_PAIRS = 8
NEUTRAL_EVAL_TEXTS = 64
NEUTRAL_PROBE_TEXTS = 16


@dataclass(frozen=True)
class Subject:
    """A model to align: a tiny architecture pretrained on the tasks' domain, or a checkpoint.

    Attributes:
        name: e.g. ``"gpt2-6"``.
        architecture: a key of ``tiny.TINY_ARCHITECTURES``, or ``"checkpoint"``.
        layers: decoder blocks of a tiny model.
        learning_rate: a healthy learning rate for this model.
        high_learning_rate: a learning rate far too high for it.
        pretrain: pretrain a tiny model on the domain first (``False``: random init, the demo).
        path: checkpoint directory (``architecture="checkpoint"``).
        steps, batch_size: the DPO run's length and batch.
    """

    name: str
    architecture: str
    layers: int = 4
    learning_rate: float = 1e-4
    high_learning_rate: float = 3e-3
    beta: float = 0.1
    pretrain: bool = True
    path: str | None = None
    steps: int = 150
    batch_size: int = 16
    eval_floor: int = 1
    """The finest outcome cadence for this subject (a real model's evaluation is not free)."""
    lora_rate_scale: float = 1.0
    """LoRA runs train at this multiple of the rates (LoRA's usual rates are ~10x full FT's)."""
    max_length: int = 128
    only_tasks: tuple[str, ...] = ()
    """The tasks this subject runs in a split (empty: all of the split's)."""

    @property
    def is_checkpoint(self) -> bool:
        return self.architecture == "checkpoint"


@dataclass(frozen=True)
class Condition:
    """A training setting; ``failing`` says whether it is meant to break the run.

    Sudden failures (``lr_too_high``, ``step_up``, ``overflow``, ...) break a run within a probe
    interval. Slow ones (``SLOW_CONDITIONS``) damage it over hundreds of steps; they run
    ``steps_scale`` times the subject's length with outcomes every ``eval_every`` steps, so that
    a warning's lead is not rounded to the probe interval.
    """

    name: str
    failing: bool
    schedule: str = "constant"
    """``constant`` (healthy lr), ``high`` (the high lr from step 0), ``warmup`` (linear from 0
    to the high lr over the run), ``step_up`` (healthy, then the high lr from mid-run), ``ramp``
    (linear from the healthy lr at step 0 to the high lr at the last step)."""
    lr_scale: float = 1.0
    beta: float | None = None
    flip_at: float | None = None
    noise: float = 0.0
    noise_ramp: float = 0.0
    """Label noise rising linearly from 0 to this share over the first ``NOISE_RAMP`` of the
    run's rows, then held."""
    overflow_at: float | None = None
    train_pairs: int | None = None
    """Distinct training pairs, repeated for as many epochs as the run takes (``None``: fresh
    pairs at every step)."""
    length_bias: int = 0
    """The chosen reply gets a tail of repeated words that grows over the run to this many: the
    labels reward length and repetition, not the task."""
    steps_scale: int = 1
    eval_every: int = 10

    def learning_rate(self, subject: Subject, step: int, steps: int) -> float:
        healthy = subject.learning_rate * self.lr_scale
        high = subject.high_learning_rate
        if self.schedule == "high":
            return high
        if self.schedule == "warmup":
            return high * min(1.0, step / (0.75 * steps))
        if self.schedule == "step_up":
            return high if step > steps // 2 else healthy
        if self.schedule == "ramp":
            return healthy + (high - healthy) * min(1.0, step / steps)
        return healthy


SLOW = {"steps_scale": 2, "eval_every": 2}
NOISE_RAMP = 2 / 3
LONG = {"steps_scale": 4}

CONDITIONS = {
    c.name: c
    for c in (
        Condition("healthy", failing=False),
        Condition("healthy_slow", failing=False, lr_scale=0.3, beta=0.3),
        Condition("lr_too_high", failing=True, schedule="high"),
        Condition("warmup_peak", failing=True, schedule="warmup"),
        Condition("step_up", failing=True, schedule="step_up"),
        Condition("beta_near_zero", failing=True, beta=1e-3),
        Condition("labels_flipped", failing=True, flip_at=0.5),
        Condition("label_noise", failing=True, noise=0.5),
        Condition("overflow", failing=True, overflow_at=0.5),
        Condition(
            "over_optimisation", failing=True, lr_scale=5.0, beta=0.02, train_pairs=64, **SLOW
        ),
        Condition("slow_ramp", failing=True, schedule="ramp", **SLOW),
        Condition("rising_noise", failing=True, noise_ramp=0.6, **SLOW),
        Condition("length_bias", failing=True, length_bias=12, **SLOW),
        Condition("healthy_long", failing=False, **LONG),
        Condition("healthy_slow_long", failing=False, lr_scale=0.3, beta=0.3, **LONG),
    )
}
SUDDEN_CONDITIONS = tuple(list(CONDITIONS)[:9])
SLOW_CONDITIONS = ("over_optimisation", "slow_ramp", "rising_noise", "length_bias")
LONG_CONDITIONS = ("healthy_long", "healthy_slow_long")


@dataclass(frozen=True)
class RunSpec:
    subject: Subject
    task: str
    condition: str
    seed: int
    framework: str
    probe_every: int | str = 10
    """The callback's ``every_n_steps``: 10, or ``"auto"`` (with ``overhead_budget``)."""
    overhead_budget: float = 0.01
    eval_every: int = 10
    log_every: int = 10
    recover: bool = False
    """Run with ``on_critical="recover"`` (``stop_on="critical"``) instead of never stopping."""
    recover_factor: float = 0.1
    max_recoveries: int = 3
    recover_every_rule: bool = False
    """Recover on every rule, ``recovery.UNRECOVERABLE_RULES`` too (to measure them)."""
    lora: bool = False
    """Train LoRA adapters (r=16) instead of every weight."""

    @property
    def steps(self) -> int:
        """Optimizer steps of the run: the subject's, times the condition's ``steps_scale``."""
        return self.subject.steps * CONDITIONS[self.condition].steps_scale

    @property
    def outcome_every(self) -> int:
        """Steps between outcome evaluations: the finer of the spec's and the condition's."""
        finest = min(self.eval_every, CONDITIONS[self.condition].eval_every)
        return max(finest, self.subject.eval_floor)

    @property
    def key(self) -> str:
        tail = "-lora" if self.lora else ""
        if self.probe_every == "auto":
            tail += f"-auto-b{self.overhead_budget:g}"
        if self.recover:
            tail += f"-recover-f{self.recover_factor:g}-m{self.max_recoveries}"
            tail += "-all" if self.recover_every_rule else ""
        return (
            f"{self.subject.name}/{self.task}/{self.condition}-s{self.seed}-{self.framework}" + tail
        )


@dataclass
class RunRecord:
    """What a run recorded; JSON-serialisable through ``to_json``."""

    spec: dict[str, Any]
    reference: dict[str, Any] | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    steps_run: int = 0
    seconds: float = 0.0
    recoveries: list[dict[str, Any]] = field(default_factory=list)
    stopped: bool = False
    snapshot_seconds: float = 0.0
    snapshot_count: int = 0
    snapshot_bytes: int = 0
    stop_reason: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), allow_nan=True)

    @classmethod
    def from_json(cls, text: str) -> RunRecord:
        return cls(**json.loads(text))


class RecordingMonitor(RampMonitor):
    """A ``RampMonitor`` that also keeps every input it received, in order."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.events: list[dict[str, Any]] = []

    def update(self, trace: Any) -> Any:
        self.events.append({"kind": "trace", "trace": trace.to_dict()})
        return super().update(trace)

    def update_logs(self, step: int, logs: Any) -> Any:
        scalars = {k: float(v) for k, v in logs.items() if isinstance(v, (int, float))}
        self.events.append({"kind": "logs", "step": int(step), "logs": scalars})
        return super().update_logs(step, logs)


# ---- models -------------------------------------------------------------------------------


def tiny_tokenizer() -> Any:
    return build_tiny_tokenizer(tokenizer_corpus(), vocab_size=TOKENIZER_VOCAB_SIZE)


def pretraining_texts(count: int, seed: int, end: str) -> list[str]:
    """Half neutral sentences, half task prompts with either reply at random (so the base knows
    every task's format and prefers neither reply), each closed by ``end`` (the EOS token, which
    TRL appends to every reply)."""
    rng = random.Random(seed)
    texts = neutral_sentences(count // 2, seed)
    tasks = list(TASKS.values())
    for i in range(count - len(texts)):
        row = tasks[i % len(tasks)].make_pairs(1, rng.getrandbits(32))[0]
        texts.append(row["prompt"] + row[rng.choice(("chosen", "rejected"))])
    rng.shuffle(texts)
    return [text + end for text in texts]


def pretrain(model: nn.Module, tokenizer: Any, seed: int, steps: int = 600) -> nn.Module:
    """Train ``model`` as a language model on ``pretraining_texts`` (AdamW, batch 32)."""
    texts = pretraining_texts(steps * 32, seed + 777, tokenizer.eos_token)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 50) * max(0.1, 1 - step / steps)
    )
    model.train()
    for step in range(steps):
        ids, mask = pad_texts(tokenizer, texts[32 * step : 32 * (step + 1)])
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    return model.eval()


def base_model(subject: Subject, tokenizer: Any, seed: int) -> nn.Module:
    """The run's starting point (its reference): cached pretrained tiny base, or a checkpoint."""
    if subject.is_checkpoint:
        from spinal_callback.probe.loading import load_local_model

        assert subject.path is not None
        return load_local_model(subject.path)
    model = build_tiny_model(
        subject.architecture, vocab_size=len(tokenizer), layers=subject.layers, seed=seed
    )
    if not subject.pretrain:
        return model
    cache = RESULTS / "bases" / f"{subject.architecture}-{subject.layers}-s{seed}.pt"
    if cache.is_file():
        model.load_state_dict(torch.load(cache, weights_only=True))
        return model.eval()
    pretrain(model, tokenizer, seed)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), cache)
    return model


def prepare_base(subject: Subject, seed: int) -> None:
    """Build and cache a tiny subject's pretrained base (a no-op for the others)."""
    if not subject.is_checkpoint and subject.pretrain:
        base_model(subject, tiny_tokenizer(), seed)


def pad_texts(tokenizer: Any, texts: list[str]) -> tuple[Tensor, Tensor]:
    """Right-padded int64 ``[b, t]`` ids (special tokens included) and attention mask."""
    encoded = [tokenizer(text)["input_ids"] for text in texts]
    length = max(len(ids) for ids in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(texts), length), pad, dtype=torch.int64)
    mask = torch.zeros((len(texts), length), dtype=torch.int64)
    for row, tokens in enumerate(encoded):
        ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(tokens)] = 1
    return ids, mask


# ---- data ---------------------------------------------------------------------------------


@dataclass
class RunData:
    train: list[dict[str, str]]
    held_out: list[dict[str, str]]
    neutral_probe: list[str]
    neutral_eval: list[str]


def run_data(spec: RunSpec, tokenizer: Any) -> RunData:
    """Training rows in the order they are consumed (labels flipped or noised, replies biased,
    as the condition says), held-out pairs, and two disjoint sets of neutral text: the probe's
    and the outcome's. Task ``chat`` is the real model's chat data (``bench/chat_data.py``)."""
    condition = CONDITIONS[spec.condition]
    subject = spec.subject
    rows = spec.steps * subject.batch_size
    if spec.task == "chat":
        from bench.chat_data import chat_split

        assert subject.path is not None
        train, held_out = chat_split(Path(subject.path), tokenizer, CHAT_EVAL_PAIRS, spec.seed)
        train = train[: condition.train_pairs]
    else:
        distinct = condition.train_pairs or rows
        train, held_out = TASKS[spec.task].split(distinct, EVAL_PAIRS, spec.seed)
    distinct = len(train)
    train = [dict(train[index % distinct]) for index in range(rows)]
    rng = random.Random(spec.seed + 55)
    flip_from = (
        int(condition.flip_at * spec.steps) * subject.batch_size
        if condition.flip_at is not None
        else None
    )
    for index, row in enumerate(train):
        flip = flip_from is not None and index >= flip_from
        noise = condition.noise + condition.noise_ramp * min(1.0, index / (NOISE_RAMP * rows))
        if flip or rng.random() < noise:
            row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
        if condition.length_bias:
            row["chosen"] = lengthened(row["chosen"], condition.length_bias * index // rows)
    if subject.is_checkpoint or not subject.pretrain:
        probe, evaluation = list(DEFAULT_NEUTRAL_TEXTS), list(ENGLISH_EVAL_TEXTS)
    else:
        pool = list(dict.fromkeys(neutral_sentences(400, spec.seed + 20_000)))
        probe, evaluation = (
            pool[:NEUTRAL_PROBE_TEXTS],
            pool[NEUTRAL_PROBE_TEXTS:][:NEUTRAL_EVAL_TEXTS],
        )
    return RunData(train, held_out, probe, evaluation)


def lengthened(reply: str, words: int) -> str:
    """``reply`` with its last word repeated ``words`` more times (before a closing ``.``)."""
    parts = reply.split()
    if words <= 0 or not parts:
        return reply
    end = [parts.pop()] if parts[-1] == "." and len(parts) > 1 else []
    return " " + " ".join(parts + [parts[-1]] * words + end)


ENGLISH_EVAL_TEXTS = (
    "The farmer checked the fences after the storm and found two posts on the ground.",
    "A small boat crossed the lake every morning, carrying letters and fresh milk.",
    "The city council voted to plant more trees along the main road next spring.",
    "He learned to play the piano as a child and still practises every evening.",
    "The river froze in January, and people skated on it for almost three weeks.",
    "Our neighbours painted their door blue, and now it is the brightest on the street.",
    "The recipe calls for two cups of flour, one egg and a pinch of salt.",
    "After the long walk, they rested under an oak tree and ate their sandwiches.",
    "The hospital opened a new ward for children on the second floor last year.",
    "Thunder rolled over the valley, but the rain did not reach the town.",
    "She keeps her grandmother's letters in a wooden box on the top shelf.",
    "The market sells fish on Fridays and vegetables on every other day.",
    "Birds build their nests in the spring, using twigs, grass and feathers.",
    "The engineer explained how the old water mill turned grain into flour.",
    "On clear nights you can see the lights of the harbour from the hill.",
    "The teacher read a story aloud while the children drew pictures of it.",
    "The shop on the square has sold hats and gloves for more than fifty years.",
    "Fog settled over the fields, and the cows stood still by the gate.",
    "The workers finished the roof just before the first frost of the winter.",
    "A gardener planted roses along the wall, and they bloomed in early June.",
    "The choir sang in the old church, and the sound filled the whole building.",
    "Most trains stop at the small station, but the express goes straight through.",
    "The baker's son delivers bread to the houses on the hill before school.",
    "Wind turbines stood in a long line across the ridge above the sea.",
    "The students planted beans in paper cups and measured them every week.",
    "The ferry was cancelled because the waves were too high for the small harbour.",
    "A carpenter built the bookshelves from oak that grew on the family's land.",
    "The castle walls were repaired with stones taken from the nearby quarry.",
    "In the evening the streets filled with people walking home from work.",
    "The apple trees gave so much fruit that year that the branches bent down.",
    "The sailors mended their nets on the quay while the gulls watched them.",
    "The town hall clock has struck every hour for more than a century.",
)


# ---- outcomes -----------------------------------------------------------------------------


class Outcomes:
    """Held-out preference accuracy and neutral-text perplexity against the reference."""

    def __init__(
        self, tokenizer: Any, data: RunData, reference: nn.Module, reply_length: bool = False
    ) -> None:
        self.batch = collate_pairs(tokenizer, data.held_out)
        self.tokenizer = tokenizer
        self.length_prompts = [row["prompt"] for row in data.held_out[:LENGTH_PROMPTS]]
        self.reference_length = (
            reply_tokens(reference, tokenizer, self.length_prompts) if reply_length else None
        )
        self.neutral = pad_texts(tokenizer, data.neutral_eval)
        self.reference = reference
        self.reference_nll = neutral_nll(reference, *self.neutral)
        vocabulary = reference.get_output_embeddings().weight.shape[0]
        # A random-initialised reference predicts neutral text no better than chance: it has no
        # language to lose, and the perplexity outcome does not apply to it.
        self.has_language = self.reference_nll < 0.5 * math.log(vocabulary)

    def measure(self, model: nn.Module, step: int) -> dict[str, float]:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                chosen, rejected = reply_logp_shifts(model, self.reference, self.batch)
                nll = neutral_nll(model, *self.neutral)
            length = (
                None
                if self.reference_length is None
                else reply_tokens(model, self.tokenizer, self.length_prompts)
            )
        finally:
            model.train(was_training)
        margins = chosen - rejected
        finite = bool(torch.isfinite(margins).all()) and math.isfinite(nll)
        return {
            "step": float(step),
            "accuracy": float((margins > 0).float().mean()) if finite else math.nan,
            "perplexity_ratio": math.exp(min(nll - self.reference_nll, 50.0))
            if finite
            else math.nan,
            "neutral_nll": nll,
            "has_language": float(self.has_language),
            **({} if length is None else {"length_ratio": length / self.reference_length}),
        }


LENGTH_PROMPTS = 8
MAX_REPLY_TOKENS = 16


def reply_tokens(model: nn.Module, tokenizer: Any, prompts: list[str]) -> float:
    """Mean length (tokens, the closing EOS included, at most ``MAX_REPLY_TOKENS``) of the
    model's greedy replies to ``prompts``, one prompt at a time (no padding to get wrong)."""
    lengths = []
    eos = tokenizer.eos_token_id
    device = next(model.parameters()).device
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([tokenizer(prompt)["input_ids"]], device=device)
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=MAX_REPLY_TOKENS,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=eos,
            )[0, ids.shape[1] :].tolist()
            lengths.append(out.index(eos) + 1 if eos in out else len(out))
    return sum(lengths) / len(lengths)


def neutral_nll(model: nn.Module, ids: Tensor, mask: Tensor) -> float:
    """Mean next-token NLL (nats per token) of the real tokens of ``ids``."""
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
    logps = torch.log_softmax(logits[:, :-1], dim=-1)
    picked = logps.gather(-1, ids[:, 1:, None].to(device)).squeeze(-1)
    real = mask[:, 1:].to(device).bool()
    return float(-picked[real].mean())


def overflow_gradients(model: nn.Module, step: int, start: int) -> None:
    """fp16 gradients under a loss scale that doubles every step with no overflow check: scaled
    values above 65504 become inf, and the optimizer spreads them into the weights."""
    scale = 2.0 ** (step - start)
    for parameter in model.parameters():
        if parameter.grad is not None:
            parameter.grad.copy_((parameter.grad * scale).half().float() / scale)


# ---- drivers ------------------------------------------------------------------------------


def run(spec: RunSpec) -> RunRecord:
    """Train one labeled run and return what it recorded."""
    torch.manual_seed(spec.seed)
    TIMED_SNAPSHOTS.install()
    TIMED_SNAPSHOTS.seconds, TIMED_SNAPSHOTS.count, TIMED_SNAPSHOTS.nbytes = 0.0, 0, 0
    STOP_MESSAGES.clear()
    recovery.UNRECOVERABLE_RULES.clear()
    if not spec.recover_every_rule:
        recovery.UNRECOVERABLE_RULES.update(UNRECOVERABLE_RULES)
    if not any(isinstance(h, StopMessages) for h in logging.getLogger("spinal_callback").handlers):
        logging.getLogger("spinal_callback").addHandler(StopMessages(logging.ERROR))
    started = time.perf_counter()
    tokenizer = real_tokenizer(spec.subject) if spec.subject.is_checkpoint else tiny_tokenizer()
    policy = base_model(spec.subject, tokenizer, spec.seed).train()
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    if spec.lora:
        policy = lora_model(policy)
    data = run_data(spec, tokenizer)
    outcomes = Outcomes(
        tokenizer, data, reference, reply_length=bool(CONDITIONS[spec.condition].length_bias)
    )
    driver = run_trl if spec.framework == "trl" else run_lightning
    record = RunRecord(spec=spec_dict(spec))
    driver(spec, policy, reference, tokenizer, data, outcomes, record)
    record.seconds = time.perf_counter() - started
    return record


def lora_model(model: nn.Module) -> nn.Module:
    """``model`` with LoRA adapters (r=16, alpha 32) on every linear layer; the rest frozen."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
    return get_peft_model(model, config)


def spec_dict(spec: RunSpec) -> dict[str, Any]:
    fields = asdict(spec)
    fields["key"] = spec.key
    fields["failing"] = CONDITIONS[spec.condition].failing
    return fields


def real_tokenizer(subject: Subject) -> Any:
    from spinal_callback.probe.loading import load_local_tokenizer

    assert subject.path is not None
    return load_local_tokenizer(subject.path)


def callback_options(spec: RunSpec, data: RunData) -> dict[str, Any]:
    options: dict[str, Any] = {
        "probe_texts": [row["prompt"] for row in data.held_out[:32]],
        "neutral_texts": data.neutral_probe,
        "every_n_steps": spec.probe_every,
        "stop_on": None,
    }
    if spec.probe_every == "auto":
        options["overhead_budget"] = spec.overhead_budget
    if spec.recover:
        options.update(
            stop_on="critical",
            on_critical="recover",
            recover_lr_factor=spec.recover_factor,
            max_recoveries=spec.max_recoveries,
        )
    return options


def beta_of(spec: RunSpec) -> float:
    condition = CONDITIONS[spec.condition]
    return condition.beta if condition.beta is not None else spec.subject.beta


def lr_lambda(spec: RunSpec) -> Callable[[int], float]:
    """Multiplier of the subject's healthy lr at each optimizer step (for ``LambdaLR``)."""
    condition, subject = CONDITIONS[spec.condition], spec.subject
    return lambda step: (
        condition.learning_rate(subject, step + 1, spec.steps) / (subject.learning_rate)
    )


def optimizer_and_schedule(spec: RunSpec, parameters: Any) -> tuple[Any, Any]:
    """AdamW at the subject's healthy lr (``Subject.lora_rate_scale`` times it for LoRA),
    scaled every step by the condition's schedule."""
    rate = spec.subject.learning_rate * (spec.subject.lora_rate_scale if spec.lora else 1.0)
    optimizer = torch.optim.AdamW(parameters, lr=rate, weight_decay=0.0)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(spec))


def inject_overflow(spec: RunSpec, model: nn.Module, step: int) -> None:
    """Corrupt the gradients of optimizer step ``step`` when the condition overflows by then."""
    condition = CONDITIONS[spec.condition]
    if condition.overflow_at is None:
        return
    start = int(condition.overflow_at * spec.steps)
    if step > start:
        overflow_gradients(model, step, start)


def measure_end(record: RunRecord, outcomes: Outcomes, model: nn.Module, step: int) -> None:
    """The outcome of the weights the run ends with: after every callback of the last step (a
    recovery at the last step rewinds after the step's own evaluation), replacing that one."""
    if record.evals and int(record.evals[-1]["step"]) == step:
        record.evals.pop()
    record.evals.append(outcomes.measure(model, step))


def record_monitor(spinal: Any) -> RecordingMonitor:
    """Swap the callback's monitor for one that records every input it receives."""
    monitor = RecordingMonitor(spinal.config)
    spinal.runner.use_monitor(monitor)
    return monitor


def finish(record: RunRecord, spinal: Any, monitor: RecordingMonitor, steps: int) -> None:
    runner = spinal.runner
    reference = runner.reference
    record.reference = None if reference is None else reference.to_dict()
    record.events = monitor.events
    record.steps_run = steps
    record.recoveries = [{**asdict(r), "steps_lost": r.steps_lost} for r in runner.recoveries]
    record.stopped = runner.stopped
    if runner.stopped:
        record.stop_reason = STOP_MESSAGES[0] if STOP_MESSAGES else "stopped"
    if runner.recovery is not None:
        record.snapshot_seconds = TIMED_SNAPSHOTS.seconds
        record.snapshot_count = TIMED_SNAPSHOTS.count
        record.snapshot_bytes = TIMED_SNAPSHOTS.nbytes


class SnapshotTimer:
    """Wall time spent taking recovery snapshots in this process (``Snapshot.take`` wrapped)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.count = 0
        self.nbytes = 0
        self._installed = False

    def install(self) -> None:
        from spinal_callback.training import recovery

        if self._installed:
            return
        self._installed = True
        take = recovery.Snapshot.take.__func__  # type: ignore[attr-defined]

        def timed(cls: Any, *args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            snapshot = take(cls, *args, **kwargs)
            self.seconds += time.perf_counter() - started
            self.count += 1
            self.nbytes = snapshot.nbytes
            return snapshot

        recovery.Snapshot.take = classmethod(timed)  # type: ignore[method-assign,assignment]


TIMED_SNAPSHOTS = SnapshotTimer()
UNRECOVERABLE_RULES = dict(recovery.UNRECOVERABLE_RULES)
"""The package's own list, restored before each run (``recover_every_rule`` empties it)."""
STOP_MESSAGES: list[str] = []
"""The stop messages the callback logged in this process (``StopMessages``)."""


class StopMessages(logging.Handler):
    """Keeps the ``spinal_callback`` logger's ERROR lines that announce a stop."""

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if "training stopped" in text:
            STOP_MESSAGES.append(text)


def run_trl(
    spec: RunSpec,
    policy: nn.Module,
    reference: nn.Module,
    tokenizer: Any,
    data: RunData,
    outcomes: Outcomes,
    record: RunRecord,
) -> None:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from spinal_callback.integrations.transformers import SpinalTrainerCallback

    subject = spec.subject
    spinal = SpinalTrainerCallback(ref_model=reference, **callback_options(spec, data))
    monitor = record_monitor(spinal)

    class Labels(TrainerCallback):  # type: ignore[misc]
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            record.evals.append(outcomes.measure(kwargs["model"], 0))

        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            inject_overflow(spec, kw["model"], state.global_step + 1)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step % spec.outcome_every == 0:
                record.evals.append(outcomes.measure(kwargs["model"], state.global_step))

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            measure_end(record, outcomes, kwargs["model"], state.global_step)

    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer, scheduler = optimizer_and_schedule(spec, trainable)
    args = DPOConfig(
        output_dir=str(RESULTS / "scratch" / spec.key),
        max_steps=spec.steps,
        per_device_train_batch_size=subject.batch_size,
        beta=beta_of(spec),
        max_length=subject.max_length,
        logging_steps=spec.log_every,
        save_strategy="no",
        report_to=[],
        bf16=False,
        use_cpu=True,
        disable_tqdm=True,
        seed=spec.seed,
        train_sampling_strategy="sequential",
    )
    trainer = DPOTrainer(
        model=policy,
        ref_model=reference,
        args=args,
        train_dataset=Dataset.from_list(data.train),
        processing_class=tokenizer,
        callbacks=[Labels(), spinal],
        optimizers=(optimizer, scheduler),
    )
    trainer.train()
    finish(record, spinal, monitor, trainer.state.global_step)


def run_lightning(
    spec: RunSpec,
    policy: nn.Module,
    reference: nn.Module,
    tokenizer: Any,
    data: RunData,
    outcomes: Outcomes,
    record: RunRecord,
) -> None:
    import warnings
    from functools import partial

    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from recipes.lightning_dpo import DPOModule
    from spinal_callback.integrations.lightning import SpinalCallback

    subject = spec.subject
    spinal = SpinalCallback(**callback_options(spec, data))
    monitor = record_monitor(spinal)

    class Module(DPOModule):
        def configure_optimizers(self) -> Any:
            trainable = [p for p in self.model.parameters() if p.requires_grad]
            optimizer, scheduler = optimizer_and_schedule(spec, trainable)
            return {
                "optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
            }

    class Labels(pl.Callback):
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            record.evals.append(outcomes.measure(pl_module.model, 0))

        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            inject_overflow(spec, pl_module.model, trainer.global_step + 1)

        def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
            if trainer.global_step % spec.outcome_every == 0:
                record.evals.append(outcomes.measure(pl_module.model, trainer.global_step))

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            measure_end(record, outcomes, pl_module.model, trainer.global_step)

    loader = DataLoader(
        data.train,
        batch_size=subject.batch_size,
        shuffle=False,
        collate_fn=partial(collate_pairs, tokenizer),
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=spec.steps,
        gradient_clip_val=1.0,
        log_every_n_steps=spec.log_every,
        default_root_dir=str(RESULTS / "scratch" / spec.key),
        logger=False,
        callbacks=[Labels(), spinal],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    module = Module(policy, tokenizer, beta_of(spec), subject.learning_rate, reference=reference)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, loader)
    finish(record, spinal, monitor, trainer.global_step)

"""GuardedProbe: the policy's probe and its reference's, run so that no failure reaches training.

Out of memory: the batch is halved once, for the policy and the reference together (the two keep
sharing their lens tokens, so every trace of the run measures the same tokens). Any other error,
or a second failure: logged with its traceback, and probing is off for the run. Under a sharding
engine the probe's forward runs collectives, so the ranks agree on retrying, giving up and
switching probing off through the injected ``reduce_any``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from spinal_callback.config import SpinalConfig
from spinal_callback.monitor.alerts import Alert
from spinal_callback.probe.batch import build_probe_batch
from spinal_callback.probe.drift import DriftMeter
from spinal_callback.probe.model_access import check_reference_model, peft_model_in
from spinal_callback.probe.sharding import sharding_root
from spinal_callback.probe.spinal_probe import ProbeBatch, SpinalProbe
from spinal_callback.probe.texts import DEFAULT_NEUTRAL_TEXTS
from spinal_callback.probe.trace import DepthTrace

logger = logging.getLogger("spinal_callback")
PROBE_FAILED = "probe_failed"
ReduceAny = Callable[[bool], bool]
RaiseAlert = Callable[[Alert], None]


class GuardedProbe:
    """Runs the probe of the policy (and of its reference) without ever raising into training.

    Args:
        probe: the policy's probe.
        reference_probe: the reference model's probe, sharing ``probe.lens_tokens`` (or
            ``None``: the adapters-off PEFT policy, else the first trace, is the reference).
        reduce_any: ``True`` on every rank if ``True`` on any (the runner's collective).
        raise_alert: where ``probe_failed`` alerts go.
    """

    def __init__(
        self,
        probe: SpinalProbe,
        reference_probe: SpinalProbe | None,
        reduce_any: ReduceAny,
        raise_alert: RaiseAlert,
    ) -> None:
        self._probe = probe
        self._reference_probe = reference_probe
        self.reduce_any = reduce_any
        self._raise_alert = raise_alert
        self._disabled = False

    @classmethod
    def build(
        cls,
        config: SpinalConfig,
        models: tuple[nn.Module, nn.Module | None],
        tokenizer: Any,
        texts: tuple[Sequence[str] | None, Sequence[str] | None, Any],
        reduce_any: ReduceAny,
        raise_alert: RaiseAlert,
    ) -> GuardedProbe:
        """The probes of a run: ``models`` is (policy, reference or ``None``), ``texts`` is
        (probe texts, neutral texts, train dataset): the probe texts, else the dataset's
        prompts; the neutral texts, else ``texts.DEFAULT_NEUTRAL_TEXTS``.

        Raises:
            ValueError: no tokenizer or texts, a probe the model cannot take, or a reference
                model of another architecture or size (``check_reference_model``).
        """
        (model, reference_model), (probe_texts, neutral_texts, dataset) = models, texts
        batch = build_probe_batch(config, tokenizer, probe_texts, dataset)
        neutral = None
        if config.neutral_probe:
            neutral_texts = neutral_texts or list(DEFAULT_NEUTRAL_TEXTS)
            neutral = ProbeBatch.from_texts(tokenizer, neutral_texts, config.max_probe_length)
        if reference_model is not None:
            check_reference_model(
                model,
                reference_model,
                blocks_path=config.blocks_path,
                final_norm_path=config.final_norm_path,
                head_path=config.head_path,
            )
        probe = SpinalProbe(model, batch, config, neutral)
        reference_probe = None
        if reference_model is not None:
            reference_probe = SpinalProbe(
                reference_model, batch, config, neutral, probe.lens_tokens
            )
        return cls(probe, reference_probe, reduce_any, raise_alert)

    @property
    def probe(self) -> SpinalProbe:
        """The policy's probe (a halved one after running out of memory)."""
        return self._probe

    @property
    def reference_probe(self) -> SpinalProbe | None:
        return self._reference_probe

    @property
    def disabled(self) -> bool:
        """Probing is off for the run (a failure, or another rank's)."""
        return self._disabled

    def restore(self, disabled: bool) -> None:
        """A resumed run keeps probing off if it was."""
        self._disabled = bool(disabled)

    @property
    def sharded(self) -> bool:
        """Whether the probe's forward runs collectives: FSDP or ``fully_shard`` gathers, or
        DeepSpeed ZeRO-3's partitioned parameters."""
        return sharding_root(self._probe.model) is not None or self._probe.parts.zero3_partitioned

    def run(self, step: int) -> DepthTrace | None:
        """The policy's trace at ``step``, or ``None`` (probing off, or the probe failed)."""
        if self.sharded:
            self._disabled = self.reduce_any(self._disabled)
        if self._disabled:
            return None
        trace, error = _attempt(self._probe, step)
        out_of_memory = error is not None and is_out_of_memory(error)
        if self.sharded:
            out_of_memory = self.reduce_any(out_of_memory)
            if not out_of_memory and self.reduce_any(error is not None):
                self._give_up(step, error or _failed_elsewhere(), "")
                return None
        if not out_of_memory:
            if error is not None:
                self._give_up(step, error, "")
            return trace
        return self._retry_halved(step, error)

    def trace_reference(self, step: int) -> DepthTrace | None:
        """The reference's trace: TRL's ``ref_model``, else the PEFT policy with adapters off,
        else ``None`` (the caller takes the policy's first trace)."""
        with failures_logged("reference probe", "the first trace is the baseline"):
            if self._reference_probe is not None:
                return self._reference_probe.run(step)
            peft_model = peft_model_in(self._probe.model)
            if peft_model is not None:
                with peft_model.disable_adapter():  # type: ignore[operator]
                    return self._probe.run(step)
        return None

    def reference_outputs(self, drift: DriftMeter) -> Tensor | None:
        """The reference's block outputs for the drift (``None``: the policy is its own
        snapshot)."""
        if self._reference_probe is not None:
            return drift.outputs_of(self._reference_probe.parts)
        peft_model = peft_model_in(self._probe.model)
        if peft_model is None:
            return None
        with peft_model.disable_adapter():  # type: ignore[operator]
            return drift.outputs_of(self._probe.parts)

    def _retry_halved(self, step: int, error: BaseException | None) -> DepthTrace | None:
        """Out of memory: once more with half the batch, the reference's probe halved to the
        same rows and sharing the halved policy probe's lens tokens."""
        self._raise_alert(
            probe_alert(
                step,
                f"the probe ran out of memory ({error or _failed_elsewhere()!r}); retrying with "
                "half the batch",
            )
        )
        try:
            halved: SpinalProbe | None = halve(self._probe)
            trace, error = _attempt(halved, step) if halved is not None else (None, None)
        except ValueError as halving_error:
            halved, trace, error = None, None, halving_error
        if self.sharded and self.reduce_any(error is not None):
            error = error or _failed_elsewhere()
        if error is not None or halved is None:
            self._give_up(step, error or _failed_elsewhere(), " again, with half the batch")
            return None
        self._probe = halved
        if self._reference_probe is not None:
            self._reference_probe = halve(self._reference_probe, halved.lens_tokens)
        return trace

    def _give_up(self, step: int, error: BaseException, when: str) -> None:
        self._disabled = True
        logger.error("spinal-callback: the probe failed%s at step %d", when, step, exc_info=error)
        self._raise_alert(
            probe_alert(
                step,
                f"the probe failed{when} ({error!r}); probing is off for this run and training "
                "goes on (the traceback is in the log; please report it if the model is supported)",
            )
        )


def is_out_of_memory(error: BaseException) -> bool:
    """True for an allocator failure (CUDA, MPS or host), the one error a smaller batch fixes."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text
    )


def halve(probe: SpinalProbe, lens_tokens: dict[int, int] | None = None) -> SpinalProbe:
    """The same probe on the first half of its rows; ``lens_tokens``: share another probe's
    lens-token counts (a reference beside its policy), else settle its own at its first run.

    Raises:
        ValueError: the batch has a single row.
    """
    neutral = probe.neutral_batch
    return SpinalProbe(
        probe.model,
        _half(probe.batch),
        probe.config,
        None if neutral is None else _half(neutral),
        lens_tokens,
    )


def _half(batch: ProbeBatch) -> ProbeBatch:
    rows = batch.input_ids.shape[0] // 2
    if rows == 0:
        raise ValueError("the probe batch has a single row and cannot be halved")
    return ProbeBatch(batch.input_ids[:rows], batch.attention_mask[:rows])


def _attempt(probe: SpinalProbe, step: int) -> tuple[DepthTrace | None, BaseException | None]:
    try:
        return probe.run(step), None
    except Exception as error:  # the training run must outlive any probe failure
        release_cached_memory()
        return None, error


def _failed_elsewhere() -> RuntimeError:
    return RuntimeError("the probe failed on another rank")


def probe_alert(step: int, message: str) -> Alert:
    """A ``probe_failed`` warning: a failure of this tool, which never stops training."""
    return Alert(
        step=step,
        level="warning",
        rule=PROBE_FAILED,
        metric="spinal/probe",
        value=float("nan"),
        threshold=float("nan"),
        message=message,
    )


def release_cached_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def failures_logged(what: str, consequence: str) -> Iterator[None]:
    """Log any exception of the block with its traceback instead of raising it."""
    try:
        yield
    except Exception:  # a missing reference or drift must not end training
        release_cached_memory()
        logger.exception("spinal-callback: the %s failed; %s", what, consequence)

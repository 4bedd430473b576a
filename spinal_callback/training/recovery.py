"""Recovery: on an alert at the ``stop_on`` level, rewind to the last good state and go on with a
gentler step, instead of stopping.

The good state lives in host memory (or, with ``recover_snapshot_dir``, in files there): a copy
of the trainable parameters, every optimizer's, scheduler's and gradient scaler's state and the
rules' state, taken at a quiet probe. A copy
becomes *good* once the next probe is quiet too (no rank warned in between, by a probe or by the
trainer's logs), since a probe cannot see the logs that follow it; the untouched model at step 0
is good at once. A recovery restores the good copy, multiplies the learning rate by
``recover_lr_factor`` for the rest of the run (the schedulers' ``base_lrs`` too, so that a
``LambdaLR`` that recomputes the rate from them keeps the factor) and lets training go on from
the next batch: the batches between the good state and the alert are skipped, and the step
counter never goes back.

A snapshot costs host memory of the trainable parameters plus the optimizer's state (AdamW:
three copies of the trainable parameters), twice (the good copy and the newest one), and one
device-to-host copy of that state at each quiet probe.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from spinal_callback import distributed
from spinal_callback.atomic import replace_atomically
from spinal_callback.config import SpinalConfig
from spinal_callback.monitor.alerts import Alert

logger = logging.getLogger("spinal_callback")
STATE_VERSION = 1
RECOVERED = "recovered"
UNRECOVERABLE_RULES: dict[str, str] = {
    "preference_reversal": (
        "the DPO loss stayed above ln 2: the model is learning against its labels (flipped or "
        "noisy pairs), a fault of the data that a gentler step cannot fix"
    ),
    "loss_spike": (
        "the DPO loss stayed high: the preference signal turned against the model, which on "
        "the benchmark's dev split a rewind with a lower learning rate never fixed (5 of 5 runs "
        "still failed); check the data first"
    ),
}
"""Rules whose cause a gentler step cannot fix, and why; they stop the run as without recovery.
Measured on the benchmark's dev split with recovery allowed on every rule (``python -m
bench.recovery --split dev --every-rule``): runs whose recovery a ``loss_spike`` or a
``preference_reversal`` triggered (flipped labels, and a learning-rate step-up on a
random-initialised model) never ended healthy; those that ``language_drift`` triggered mostly
did (docs/benchmarks.md)."""
HOST_MEMORY_SHARE = 0.5
"""The most of the host's available memory the two snapshots may take; more is refused at train
begin."""
GROUP_RATES = ("lr", "initial_lr", "max_lr", "min_lr")
"""Learning-rate entries of an optimizer's param group that schedulers read (``initial_lr``:
every scheduler's start; ``max_lr``/``min_lr``: ``OneCycleLR``)."""


@dataclass
class TrainingState:
    """What a recovery restores, as the framework holds it.

    Attributes:
        parameters: the trainable parameters (``requires_grad``) at train begin, any device and
            dtype; a parameter unfrozen later is neither kept nor restored.
        optimizers: ``torch.optim.Optimizer``-like objects (``state_dict``/``load_state_dict``
            and ``param_groups``; accelerate's wrapped optimizer works).
        schedulers: learning-rate schedulers (``state_dict``/``load_state_dict``; ``base_lrs``
            when they have it), possibly wrapped in an object whose ``scheduler`` attribute is
            the scheduler (accelerate).
        scalers: gradient scalers (``torch.amp.GradScaler``), empty without mixed precision.
    """

    parameters: list[Tensor]
    optimizers: list[Any] = field(default_factory=list)
    schedulers: list[Any] = field(default_factory=list)
    scalers: list[Any] = field(default_factory=list)

    @classmethod
    def of(
        cls,
        model: nn.Module,
        optimizers: Sequence[Any] = (),
        schedulers: Sequence[Any] = (),
        scalers: Sequence[Any] = (),
    ) -> TrainingState:
        """The trainable parameters of ``model`` and the given objects (``None``s dropped)."""
        parameters: list[Tensor] = [p for p in model.parameters() if p.requires_grad]
        if not parameters:
            raise ValueError(
                "on_critical='recover' found no trainable parameter in the model (all have "
                "requires_grad=False); there is nothing to restore"
            )
        if any(_is_dtensor(p) for p in parameters):
            raise ValueError(
                sharded_engine_reason(["DTensor parameters (tensor or model parallel)"])
            )
        present = [o for o in optimizers if o is not None]
        if not present:
            raise ValueError(
                "on_critical='recover' got no optimizer from the trainer at train begin; it "
                "restores the optimizer's state, so it needs the trainer's own (HF: pass "
                "optimizers=(...) or let the Trainer create it; Lightning: configure_optimizers)"
            )
        return cls(
            parameters,
            present,
            [s for s in schedulers if s is not None],
            [s for s in scalers if s is not None],
        )

    def trainable_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters)

    def learning_rate(self) -> float:
        """The first optimizer's first group's rate (``nan`` without an optimizer)."""
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                return float(group["lr"])
        return math.nan


@dataclass
class Snapshot:
    """Host copies of a ``TrainingState`` at one step, and the rules' state there.

    Attributes:
        step: the optimizer step it was taken after.
        lr_scale: the recovery factor already in its learning rates.
        parameters: CPU tensors, one per trainable parameter, same dtype.
        optimizers, schedulers, scalers: their ``state_dict()``, tensors copied to the host.
        rules: the ``RampMonitor``'s state (without the reference, which never changes).
    """

    step: int
    lr_scale: float
    parameters: list[Tensor]
    optimizers: list[Any]
    schedulers: list[Any]
    scalers: list[Any]
    rules: dict[str, Any]

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data held on the host."""
        tensors = [*self.parameters, *_tensors(self.optimizers), *_tensors(self.schedulers)]
        return sum(t.numel() * t.element_size() for t in tensors)

    @classmethod
    def take(
        cls,
        training: TrainingState,
        step: int,
        lr_scale: float,
        rules: dict[str, Any],
        reuse: Snapshot | None = None,
    ) -> Snapshot:
        """Copy ``training`` to the host, into ``reuse``'s buffers where shapes and dtypes match
        (no allocation at steady state). Reads only: the training state is left as it was."""
        with torch.no_grad():
            old = reuse.parameters if reuse is not None else []
            parameters = [
                _copy_into(p.detach(), old[i] if i < len(old) else None)
                for i, p in enumerate(training.parameters)
            ]
            old_states = reuse.optimizers if reuse is not None else []
            optimizers = [
                _optimizer_copy(o.state_dict(), old_states[i] if i < len(old_states) else None)
                for i, o in enumerate(training.optimizers)
            ]
            schedulers = [_host_copy(_scheduler(s).state_dict(), None) for s in training.schedulers]
            scalers = [_host_copy(s.state_dict(), None) for s in training.scalers]
        return cls(step, lr_scale, parameters, optimizers, schedulers, scalers, rules)

    def restore(self, training: TrainingState, relative_scale: float) -> None:
        """Write this snapshot back into ``training``; then multiply every learning rate the
        optimizers and schedulers hold by ``relative_scale``. Gradients are cleared."""
        with torch.no_grad():
            for parameter, saved in zip(training.parameters, self.parameters, strict=True):
                parameter.copy_(saved)
                parameter.grad = None
        for optimizer, state in zip(training.optimizers, self.optimizers, strict=True):
            # Cloned: load_state_dict keeps a tensor already on the right device as it is, and
            # the optimizer's in-place updates would then write into the snapshot.
            optimizer.load_state_dict(_clone(state))
            scale_group_rates(optimizer.param_groups, relative_scale)
        for scheduler, state in zip(training.schedulers, self.schedulers, strict=True):
            inner = _scheduler(scheduler)
            inner.load_state_dict(copy.deepcopy(state))
            scale_scheduler_rates(inner, relative_scale)
        for scaler, state in zip(training.scalers, self.scalers, strict=True):
            scaler.load_state_dict(copy.deepcopy(state))


@dataclass(frozen=True)
class StoredSnapshot:
    """A snapshot in a file (``recover_snapshot_dir``): its step and factor, and where it is.

    The file holds the ``Snapshot`` fields; it is written straight from the training state
    (``torch.save`` copies one tensor at a time), so no host copy of the whole state is made.
    """

    step: int
    lr_scale: float
    path: Path

    @classmethod
    def write(
        cls,
        training: TrainingState,
        step: int,
        lr_scale: float,
        rules: dict[str, Any],
        path: Path,
    ) -> StoredSnapshot:
        """Write the training state to ``path`` atomically (reads only)."""
        payload = {
            "step": step,
            "lr_scale": lr_scale,
            "parameters": [p.detach() for p in training.parameters],
            "optimizers": [o.state_dict() for o in training.optimizers],
            "schedulers": [_scheduler(s).state_dict() for s in training.schedulers],
            "scalers": [s.state_dict() for s in training.scalers],
            "rules": rules,
        }
        replace_atomically(path, lambda partial: torch.save(payload, partial))
        return cls(step, lr_scale, path)

    def moved(self, path: Path) -> StoredSnapshot:
        """This snapshot renamed to ``path`` (replacing what was there)."""
        os.replace(self.path, path)
        return StoredSnapshot(self.step, self.lr_scale, path)

    def load(self) -> Snapshot:
        """The snapshot, its tensors on the host. The file is this run's own (written by
        ``write``): it is read with full unpickling."""
        payload = torch.load(self.path, map_location="cpu", weights_only=False)
        return Snapshot(**payload)


def scale_group_rates(groups: Sequence[dict[str, Any]], factor: float) -> None:
    """Multiply each group's learning-rate entries (``GROUP_RATES``) by ``factor``."""
    for group in groups:
        for key in GROUP_RATES:
            value = group.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                group[key] = value * factor
            elif isinstance(value, Tensor):
                value.mul_(factor)


SCHEDULER_RATES = ("base_lrs", "_last_lr", "min_lrs", "max_lrs", "eta_min")
"""Rates a scheduler keeps and recomputes from: ``base_lrs`` (``LambdaLR``, cosine, ...),
``min_lrs`` (``ReduceLROnPlateau``), ``max_lrs`` (``CyclicLR``), ``eta_min`` (cosine floors)."""


def scale_scheduler_rates(scheduler: Any, factor: float) -> None:
    """Multiply the rates a scheduler recomputes from (``SCHEDULER_RATES``) by ``factor``, and
    those of the schedulers it chains (``SequentialLR``, ``ChainedScheduler``), so that every
    later ``step()`` keeps the factor."""
    for name in SCHEDULER_RATES:
        rates = getattr(scheduler, name, None)
        if isinstance(rates, list) and all(_is_rate(r) for r in rates):
            setattr(scheduler, name, [r * factor for r in rates])
        elif isinstance(rates, (int, float)) and _is_rate(rates):
            setattr(scheduler, name, rates * factor)
    for child in getattr(scheduler, "_schedulers", None) or []:
        scale_scheduler_rates(child, factor)


def _is_rate(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class RecoveryReport:
    """One recovery, as the ``recovered`` record states it."""

    step: int
    rewound_to: int
    attempt: int
    learning_rate: float
    lr_scale: float
    cause: str

    @property
    def steps_lost(self) -> int:
        return self.step - self.rewound_to

    def record(self, max_recoveries: int) -> Alert:
        """The ``recovered`` record for the event log and the TensorBoard text tab."""
        message = (
            f"recovered at step {self.step} from {self.cause}: rewound to the good state of step "
            f"{self.rewound_to} ({self.steps_lost} steps of updates dropped, the step counter "
            f"goes on), learning rate now {self.learning_rate:.4g} (x{self.lr_scale:.4g} for the "
            f"rest of the run); recovery {self.attempt} of {max_recoveries}"
        )
        return Alert(
            step=self.step,
            level="warning",
            rule=RECOVERED,
            metric="spinal/recoveries",
            value=float(self.attempt),
            threshold=float(max_recoveries),
            message=message,
            details={
                "rewound_to": self.rewound_to,
                "steps_lost": self.steps_lost,
                "learning_rate": self.learning_rate,
                "lr_scale": self.lr_scale,
                "attempt": self.attempt,
                "cause": self.cause,
            },
        )


class Recovery:
    """The good state, the attempts, and the decision to recover or to stop.

    Args:
        config: ``recover_lr_factor`` and ``max_recoveries`` are read here.
        available_memory: bytes of host memory available (``host_available_memory`` unless a
            test injects it).
    """

    def __init__(
        self,
        config: SpinalConfig,
        available_memory: Callable[[], int | None] | None = None,
    ) -> None:
        self.config = config
        self._available_memory = available_memory or host_available_memory
        self._directory = (
            None if config.recover_snapshot_dir is None else Path(config.recover_snapshot_dir)
        )
        self._training: TrainingState | None = None
        self._run_id = "run"
        self._loaded: Snapshot | None = None
        self._good: Snapshot | StoredSnapshot | None = None
        self._newest: Snapshot | StoredSnapshot | None = None
        self._spare: Snapshot | None = None
        self._attempts = 0
        self._lr_scale = 1.0
        self._reports: list[RecoveryReport] = []

    attempts = property(lambda self: self._attempts, doc="Recoveries so far in this run.")
    lr_scale = property(lambda self: self._lr_scale, doc="Product of the factors applied.")
    reports = property(lambda self: list(self._reports), doc="This process's recoveries.")
    good = property(lambda self: self._good, doc="The state a recovery now restores.")
    newest = property(lambda self: self._newest, doc="The newest quiet snapshot, not yet good.")

    @property
    def snapshot_bytes(self) -> int:
        """Bytes of the good snapshot (in memory or on disk; 0 before the first)."""
        good = self._good
        if isinstance(good, StoredSnapshot):
            return good.path.stat().st_size if good.path.exists() else 0
        return 0 if good is None else good.nbytes

    def watch(self, training: TrainingState, run_id: str = "run") -> None:
        """Take the training state to snapshot and restore; refuse, before any step, two
        snapshots that would not fit in ``HOST_MEMORY_SHARE`` of the host's available memory.

        Raises:
            MemoryError: the estimate, for every rank of this host (``LOCAL_WORLD_SIZE``), does
                not fit (the message says what to do instead).
            OSError: ``recover_snapshot_dir`` has not room for three copies (two and one being
                written), or cannot be created.
        """
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
        estimate = 2 * training.trainable_bytes() * (1 + 2 * len(training.optimizers))
        estimate *= max(1, local_ranks)
        self._run_id = run_id
        if self._directory is not None:
            self._check_disk(estimate)
        else:
            available = self._available_memory()
            if available is not None and estimate > HOST_MEMORY_SHARE * available:
                raise MemoryError(
                    f"on_critical='recover' keeps two host copies of the trainable parameters "
                    f"and the optimizer state, about {estimate / 2**30:.2f} GiB, against "
                    f"{available / 2**30:.2f} GiB of available host memory; pass "
                    "recover_snapshot_dir= to keep them on disk, train adapters (LoRA), or use "
                    "on_critical='stop' with keep_good_checkpoint"
                )
        self._training = training

    def at_probe(
        self,
        step: int,
        quiet: bool,
        rules: dict[str, Any],
        start: bool,
        reduce_any: Callable[[bool], bool] = distributed.any_rank,
    ) -> None:
        """After a probe: a quiet one (no rank warned since the previous probe) makes the newest
        snapshot good and takes a new one; any other drops the newest. ``start``: the untouched
        model of a fresh run, good at once."""
        if self._training is None:
            return
        if self._directory is not None:
            self._at_probe_on_disk(step, quiet, rules, start, reduce_any)
            return
        if not quiet:
            newest = self._newest
            self._spare = newest if isinstance(newest, Snapshot) else self._spare
            self._newest = None
            return
        if self._newest is not None:
            old = self._good
            self._spare, self._good = old if isinstance(old, Snapshot) else None, self._newest
        snapshot = Snapshot.take(self._training, step, self._lr_scale, rules, self._spare)
        self._spare = None
        if start:
            self._good, self._newest = snapshot, None
        else:
            self._newest = snapshot

    def _at_probe_on_disk(
        self,
        step: int,
        quiet: bool,
        rules: dict[str, Any],
        start: bool,
        reduce_any: Callable[[bool], bool],
    ) -> None:
        """``at_probe`` with the snapshots in ``recover_snapshot_dir``: the newest file is
        renamed over the good one when a quiet probe vouches for it. A write that fails on any
        rank drops the newest snapshot on every rank (the ranks keep the same good state)."""
        assert self._training is not None
        good_path, newest_path = self._paths()
        if not quiet:
            self._newest = None
            return
        stored, error = None, None
        try:
            if isinstance(self._newest, StoredSnapshot):
                self._good = self._newest.moved(good_path)
            target = good_path if start else newest_path
            stored = StoredSnapshot.write(self._training, step, self._lr_scale, rules, target)
        except OSError as caught:
            error = caught
            logger.error(
                "spinal-callback: the recovery snapshot of step %d could not be written to %s "
                "(%s); the good state stays the one of step %s",
                step,
                self._directory,
                caught,
                None if self._good is None else self._good.step,
            )
        if reduce_any(error is not None) or stored is None:
            self._newest = None
        elif start:
            self._good, self._newest = stored, None
        else:
            self._newest = stored

    def _paths(self) -> tuple[Path, Path]:
        """This rank's good and newest snapshot files."""
        assert self._directory is not None
        stem = f"spinal-recovery-{self._run_id}"
        rank = distributed.rank()
        return (
            self._directory / f"{stem}-good.rank{rank}.pt",
            self._directory / f"{stem}-newest.rank{rank}.pt",
        )

    def _check_disk(self, estimate: int) -> None:
        assert self._directory is not None
        self._directory.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self._directory).free
        needed = estimate * 3 // 2
        if needed > free:
            raise OSError(
                f"on_critical='recover' with recover_snapshot_dir={str(self._directory)!r} needs "
                f"about {needed / 2**30:.2f} GiB there (two snapshots and one being written), "
                f"and {free / 2**30:.2f} GiB are free; point it at a larger disk"
            )

    def forget(self) -> None:
        """Drop every snapshot: the probe changed and the rules restarted, so a rules' state
        taken before does not compare with the new reference. The good state is kept anew from
        the next two quiet probes."""
        self._good = self._newest = self._loaded = None

    def close(self) -> None:
        """Remove this rank's snapshot files (train end); host snapshots are dropped."""
        self._good = self._newest = self._spare = self._loaded = None
        if self._directory is not None:
            for path in self._paths():
                path.unlink(missing_ok=True)

    def refusal(self, cause: Alert | None) -> str | None:
        """Why this rank cannot recover from ``cause`` (``None``: it can). ``cause`` is ``None``
        on a rank that saw no alert."""
        if self._training is None:
            return "recovery was not set up (no training state)"
        if cause is not None and cause.rule in UNRECOVERABLE_RULES:
            return f"{cause.rule}: {UNRECOVERABLE_RULES[cause.rule]}"
        if self._attempts >= self.config.max_recoveries:
            return f"the {self.config.max_recoveries} recoveries allowed are used up"
        if self._good is None:
            return "no good state was kept yet (no quiet probe vouched for one)"
        if isinstance(self._good, StoredSnapshot):
            try:
                self._loaded = self._good.load()
            except Exception as error:  # an unreadable or unpicklable file refuses alike
                return f"the good snapshot {self._good.path} could not be read ({error})"
        return None

    def recover(self, step: int, cause: Alert | None) -> tuple[RecoveryReport, dict[str, Any]]:
        """Restore the good state with the learning rate times ``recover_lr_factor``. Returns
        the report and the rules' state the good state was taken with."""
        good, training = self._good, self._training
        assert good is not None and training is not None, "refusal() first"
        snapshot = self._loaded if isinstance(good, StoredSnapshot) else good
        self._loaded = None
        assert snapshot is not None, "refusal() loads a stored snapshot first"
        scale = self._lr_scale * self.config.recover_lr_factor
        snapshot.restore(training, scale / snapshot.lr_scale)
        self._lr_scale = scale
        self._attempts += 1
        newest = self._newest
        if isinstance(newest, Snapshot):
            self._spare = newest
        self._newest = None
        why = "another rank's alert" if cause is None else f"{cause.level} {cause.rule}"
        report = RecoveryReport(
            step, snapshot.step, self._attempts, training.learning_rate(), scale, why
        )
        self._reports.append(report)
        return report, snapshot.rules

    def state_dict(self) -> dict[str, Any]:
        """Attempts and the factor applied; the snapshots stay in memory (a resumed run keeps
        its good state from its first quiet probes after the resume)."""
        return {
            "version": STATE_VERSION,
            "attempts": self._attempts,
            "lr_scale": self._lr_scale,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._attempts = int(state.get("attempts", 0))
        self._lr_scale = float(state.get("lr_scale", 1.0))


def host_available_memory() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes (``None`` where there is none)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as file:
            for line in file:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def sharded_engine_reason(names: Sequence[str]) -> str | None:
    """Why recovery is refused under a sharded engine named in ``names`` (class names or
    settings), or ``None``."""
    for name in names:
        lowered = name.lower()
        if any(word in lowered for word in ("deepspeed", "fsdp", "modelparallel", "dtensor")):
            return (
                f"on_critical='recover' is not supported under {name}: its parameters and "
                "optimizer state are sharded across ranks and only the engine's own loading "
                "restores them whole; use on_critical='stop' with keep_good_checkpoint and "
                "resume with the engine"
            )
    return None


def _scheduler(scheduler: Any) -> Any:
    """The scheduler inside accelerate's wrapper (or ``scheduler`` itself)."""
    inner = getattr(scheduler, "scheduler", None)
    return inner if inner is not None and hasattr(inner, "state_dict") else scheduler


def _copy_into(tensor: Tensor, buffer: Tensor | None) -> Tensor:
    """``tensor`` copied to the host, into ``buffer`` when it has the same shape and dtype."""
    if (
        buffer is not None
        and buffer.shape == tensor.shape
        and buffer.dtype == tensor.dtype
        and buffer.device.type == "cpu"
    ):
        return buffer.copy_(tensor)
    return tensor.to("cpu", copy=True)


def _optimizer_copy(state: Mapping[str, Any], old: Any) -> dict[str, Any]:
    """An optimizer's ``state_dict`` with its per-parameter state on the host; the param groups
    are copied as they are (a tensor learning rate stays on its device, as fused and capturable
    optimizers need)."""
    previous = old.get("state") if isinstance(old, Mapping) else None
    return {
        **{k: copy.deepcopy(v) for k, v in state.items() if k not in ("state", "param_groups")},
        "state": _host_copy(state["state"], previous),
        "param_groups": copy.deepcopy(state["param_groups"]),
    }


def _is_dtensor(tensor: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(tensor, DTensor)


def _host_copy(value: Any, old: Any) -> Any:
    """A copy of a ``state_dict`` tree with every tensor on the host, reusing ``old``'s
    tensors at the same place where they match."""
    if isinstance(value, Tensor):
        return _copy_into(value.detach(), old if isinstance(old, Tensor) else None)
    if isinstance(value, Mapping):
        mapping = old if isinstance(old, Mapping) else {}
        return {key: _host_copy(item, mapping.get(key)) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        sequence = old if isinstance(old, (list, tuple)) and len(old) == len(value) else None
        items = [
            _host_copy(item, None if sequence is None else sequence[i])
            for i, item in enumerate(value)
        ]
        return items if isinstance(value, list) else tuple(items)
    return copy.deepcopy(value)


def _clone(value: Any) -> Any:
    """A deep copy of a ``state_dict`` tree whose tensors are new tensors."""
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, Mapping):
        return {key: _clone(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_clone(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_clone(item) for item in value)
    return copy.deepcopy(value)


def _tensors(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for item in value.values() for t in _tensors(item)]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    return []

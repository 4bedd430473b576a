"""The probe under a sharding engine: FSDP (v1) and ``fully_shard`` (FSDP2).

A sharded model keeps each rank's slice of every parameter; the engine gathers a unit's
parameters in that unit's forward and frees them after. The probe needs more than one forward:
after the hooked forward it calls the final norm and the unembedding itself (the logit lens), and
those belong to the *root* unit, which the model's own forward gathers only while it runs. So the
probe runs inside ``root_parameters_whole(model)``, entered by every rank at the same point (it
all-gathers): the root's parameters are whole for the duration, the inner units gather their own
in their forwards as usual, and on exit the engine is left as the probe found it (nothing
gathered, no forward half done).

Where the root is not in the model's wrapper chain (Lightning's ``FSDPStrategy`` wraps the
``LightningModule``, not the policy inside it), the adapter names it with ``attach_root``.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

from torch import nn

from spinal_callback.probe.model_access import wrapper_chain

_ROOT_ATTRIBUTE = "_spinal_sharding_root"


def attach_root(model: nn.Module, root: nn.Module) -> None:
    """Name ``root``, a module that holds ``model`` (Lightning's wrapped ``LightningModule``), as
    the sharding root the probe of ``model`` (or of any module ``model`` wraps) gathers. A root
    that shards nothing is ignored.

    Kept as a weak reference outside the module tree, so ``model``'s parameters, state dict and
    ``repr`` do not change.
    """
    if not is_sharding_root(root):
        return
    # On every module the probe may start from: a PEFT model and the LM it wraps alike.
    for module in wrapper_chain(model):
        if module is not root:
            module.__dict__[_ROOT_ATTRIBUTE] = weakref.ref(root)


def sharding_root(model: nn.Module) -> nn.Module | None:
    """The FSDP (v1) or ``fully_shard`` root that shards ``model``: the one ``attach_root``
    named, else the outermost sharding wrapper in ``model``'s wrapper chain, else ``None``."""
    attached = model.__dict__.get(_ROOT_ATTRIBUTE)
    root = attached() if attached is not None else None
    if root is not None:
        return root
    return next((m for m in wrapper_chain(model) if is_sharding_root(m)), None)


def is_sharding_root(module: nn.Module) -> bool:
    """Whether ``module`` is an FSDP (v1) wrapper or a ``fully_shard`` module."""
    return _is_fsdp1(module) or _is_fsdp2(module)


@contextlib.contextmanager
def root_parameters_whole(model: nn.Module) -> Iterator[None]:
    """For the duration, the parameters of ``model``'s sharding root unit are whole on this
    rank; the inner units gather theirs in their own forwards. A no-op for an unsharded model.

    A collective: every rank enters it at the same point. On exit the root is resharded and,
    for ``fully_shard``, the state of a forward the probe stopped early is cleared
    (``reset_iter_state``), so the next training forward starts as if no probe had run.
    """
    root = sharding_root(model)
    if root is None:
        yield
    elif _is_fsdp1(root):
        from torch.distributed.fsdp import FullyShardedDataParallel

        # Only the root's own unit: the inner units' forwards gather and free theirs. Entering
        # also runs the root's lazy initialisation, so an inner unit called first (the probe
        # before the first training step) never takes itself for the root.
        with FullyShardedDataParallel.summon_full_params(root, writeback=False, recurse=False):
            yield
    else:
        with _fsdp2_root_whole(root, model):
            yield


@contextlib.contextmanager
def _fsdp2_root_whole(root: nn.Module, model: nn.Module) -> Iterator[None]:
    from torch.distributed.fsdp import fully_shard

    if root not in wrapper_chain(model):
        # The probe calls a module inside the root: the root must claim the root role first.
        fully_shard.state(root)._lazy_init()  # type: ignore[attr-defined]
    root.unshard()  # type: ignore[operator]
    try:
        yield
    finally:
        reset = getattr(root, "reset_iter_state", None)
        if callable(reset):
            reset()
        else:
            root.reshard()  # type: ignore[operator]


def _is_fsdp1(module: nn.Module) -> bool:
    return type(module).__name__ == "FullyShardedDataParallel"


def _is_fsdp2(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(module, FSDPModule)


__all__ = ["attach_root", "is_sharding_root", "root_parameters_whole", "sharding_root"]

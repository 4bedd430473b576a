"""GoodCheckpoint: one checkpoint from before the trouble, in paths this run created.

The adapters save it the framework's way (``save_pretrained``, ``Trainer.save_checkpoint``);
this module decides which path gets written, promoted and removed, and refuses every path that
is not this run's own (``ownership``).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Sequence

from spinal_callback.atomic import sync_directory
from spinal_callback.outputs.ownership import is_inside, mark_owned, mark_path, owner_of

logger = logging.getLogger("spinal_callback")


class GoodCheckpoint:
    """One checkpoint from before the trouble, at most two on disk, in paths this run created.

    A quiet probe cannot vouch for its own step: the logs of that same step, scored after it, may
    raise the first warning. So each quiet probe writes a *candidate* and promotes the previous
    candidate, which a later quiet probe has now vouched for, to ``path``.

    Only paths this run created are ever replaced or removed: each carries a sidecar mark naming
    the run (``ownership.mark_owned``). A ``path`` (or its ``.candidate``) that exists without
    this run's mark is the user's, and is refused here, before training.

    Args:
        path: where the good checkpoint lives (a file or a directory, as ``save`` writes it).
        save: writes a checkpoint to the path it is given (a path that does not exist).
        is_main: this process renames the files (the main process when only it writes).
        run_id: the run's identity (``Runner.run_id``).

    Raises:
        ValueError: ``path`` or its candidate exists and was not created by this run.
    """

    def __init__(
        self, path: str, save: Callable[[str], None], is_main: bool = True, run_id: str = ""
    ) -> None:
        self.path = os.fspath(path)
        self.candidate = self.path + ".candidate"
        self.save = save
        self.is_main = is_main
        self.run_id = run_id
        self.candidate_step: int | None = None
        self.refused: str | None = None
        """Why rotation stopped (a path of the user's appeared in the way), or ``None``."""
        for target in (self.path, self.candidate, self.path + ".old"):
            check_good_checkpoint_path(target, run_id)

    def rotate(self, step: int, agree: Callable[[bool], bool] = bool) -> int | None:
        """Promote the previous candidate to ``path`` and save a new candidate at ``step``;
        returns the promoted candidate's step (``None`` at the first call).

        ``agree`` is the ranks' ``reduce_any``: the main process checks the paths, and every
        rank then saves (a framework's save may be a collective) or none does.

        Raises:
            OSError: from writing or renaming (the caller logs it; training goes on).
            ValueError: a path of the user's appeared where the good checkpoint goes, on any
                rank (nothing is removed).
        """
        problem = self._path_in_the_way() if self.is_main else None
        if agree(problem is not None):
            raise ValueError(problem or "the main process found a path of the user's in the way")
        promoted = None
        if self.candidate_step is not None and self.is_main:
            self._swap_candidate_in()
            promoted = self.candidate_step
        elif self.candidate_step is not None:
            promoted = self.candidate_step
        self.candidate_step = None
        if self.is_main:
            self._remove(self.candidate)
            mark_owned(self.candidate, self.run_id)
        self.save(self.candidate)
        self.candidate_step = step
        return promoted

    def _path_in_the_way(self) -> str | None:
        """Why a path rotation would replace is not this run's, or ``None``."""
        try:
            for target in (self.path, self.candidate, self.path + ".old"):
                check_good_checkpoint_path(target, self.run_id)
        except ValueError as error:
            return str(error)
        return None

    def _swap_candidate_in(self) -> None:
        """Rename the candidate over ``path``, never leaving neither: the old one goes aside
        first, and is removed only once the new one is in place."""
        old = self.path + ".old"
        self._remove(old)
        if os.path.lexists(self.path):
            check_good_checkpoint_path(self.path, self.run_id)
            mark_owned(old, self.run_id)
            os.replace(self.path, old)
        mark_owned(self.path, self.run_id)
        os.replace(self.candidate, self.path)
        sync_directory(os.path.dirname(os.path.abspath(self.path)))
        self._remove(old)

    def _remove(self, path: str) -> None:
        """Remove ``path`` (and its mark) if it exists and this run created it."""
        if os.path.lexists(path):
            check_good_checkpoint_path(path, self.run_id)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
        mark_path(path).unlink(missing_ok=True)


def check_good_checkpoint_path(path: str | os.PathLike[str], run_id: str) -> None:
    """Refuse a good-checkpoint path that exists and was not created by run ``run_id``.

    Raises:
        ValueError: it exists and has no mark of this run (a folder or file of the user's, or
            the good checkpoint of another run).
    """
    if not os.path.lexists(path):
        return
    owner = owner_of(path)
    if owner == run_id:
        return
    whose = "another run's good checkpoint" if owner else "not created by spinal-callback"
    raise ValueError(
        f"keep_good_checkpoint: {os.fspath(path)} already exists and is {whose}; the good "
        "checkpoint replaces and removes its path, so it must name a new path of its own, "
        "e.g. keep_good_checkpoint='<output_dir>/spinal-good' (delete or move the existing one "
        "if it is yours to lose)"
    )


def check_keep_good_checkpoint(
    value: object, protected: Sequence[str | os.PathLike[str] | None] = ()
) -> None:
    """Refuse a ``keep_good_checkpoint`` argument that is not a path, or that is (or holds) a
    folder the run writes into (``protected``: the output dir, the log dir, the event log).

    Raises:
        TypeError: not a ``str`` or ``os.PathLike``.
        ValueError: it names a protected folder or one of its ancestors.
    """
    if value is None:
        return
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise TypeError(
            f"keep_good_checkpoint must be a path (str or os.PathLike) or None, got "
            f"{value!r}; e.g. keep_good_checkpoint='out/spinal-good'"
        )
    for folder in protected:
        if folder is not None and is_inside(folder, value):
            raise ValueError(
                f"keep_good_checkpoint={os.fspath(value)!r} is (or contains) {os.fspath(folder)}, "
                "which this run writes into; rotating the good checkpoint would remove it. Name "
                "a path of its own, e.g. keep_good_checkpoint='<output_dir>/spinal-good'"
            )
    if os.path.lexists(value) and owner_of(value) is None:
        check_good_checkpoint_path(value, "")


def rotate_good_checkpoint(
    good: GoodCheckpoint, step: int, agree: Callable[[bool], bool] = bool
) -> int | None:
    """``good.rotate(step, agree)``, with its failures logged instead of raised: a disk error
    costs this rotation; a path of the user's in the way ends rotation for the run on every
    rank (nothing of it is removed). Returns the promoted step, if any."""
    if good.refused is not None:
        return None
    try:
        return good.rotate(step, agree)
    except OSError as error:
        logger.error(
            "spinal-callback: cannot save the good checkpoint %s (%s); training goes on",
            good.path,
            error,
        )
    except ValueError as error:
        good.refused = str(error)
        logger.error("spinal-callback: %s. No more good checkpoints are kept this run", error)
    return None

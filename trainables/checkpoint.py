"""Training checkpoints kept in a sweep's storage (``trainables.storage``), so that a run retried
after a lost node (or a lost driver) costs only the epochs since its last checkpoint.

A run (an attack stage, a defense trial) is a sequence of training phases: the n-th call of
``engine.train`` in it is phase n (NBA: the teacher, then the student; DLP: SL, AU, then its own
FixMatch loop through :func:`next_phase`). Inside ``with checkpointing(PhaseCheckpoints(...))``
every phase saves its whole loop state every ``every`` epochs and when it ends, to
``<prefix>/phase-<n>.pt``. A retried run replays the same code: the phases that had ended load
their final state and skip their loop, the phase it stopped in goes on from its last checkpoint,
and what the run logs while replaying is not logged twice (:func:`replaying`; the log as of the
last checkpoint is restored into the defense's history, :meth:`PhaseCheckpoints.bind_log`).

This relies on a run being the same code with the same seeds on a retry, which the engine's
seeded generators give; what runs between phases (a filter, a pruning step) is recomputed from
the restored weights. State is read back with ``torch.load(weights_only=True)``: plain tensors and
numbers only.
"""
from __future__ import annotations

import contextlib
import io
import re
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch

from trainables.storage import Storage

_ACTIVE: ContextVar["PhaseCheckpoints | None"] = ContextVar("phase_checkpoints", default=None)


@dataclass(frozen=True)
class StoredCheckpoint:
    """One checkpoint object at ``key`` in ``storage`` (overwritten whole at every save)."""

    storage: Storage
    key: str

    def load(self) -> dict | None:
        if not self.storage.exists(self.key):
            return None
        return torch.load(io.BytesIO(self.storage.read_bytes(self.key)), map_location="cpu", weights_only=True)

    def save(self, state: dict) -> None:
        buf = io.BytesIO()
        torch.save(state, buf)
        self.storage.write_bytes(self.key, buf.getvalue())     # one atomic write or PUT


@dataclass
class PhaseCheckpoints:
    """The checkpoints of one run's training phases under ``prefix`` in ``storage``."""

    storage: Storage
    prefix: str
    every: int = 1                      # epochs between saves (a phase's last epoch always saves)
    _next: int = field(default=0, init=False)
    _log: list | None = field(default=None, init=False)

    def __post_init__(self):
        if self.every < 1:
            raise ValueError(f"checkpoint_every must be at least 1 (got {self.every})")
        found = [int(m.group(1)) for f in self.storage.list_files(self.prefix)
                 if (m := re.fullmatch(r"phase-(\d+)\.pt", f))]
        # the phase a retried run stopped in (-1: a first run)
        self.resume_phase = max(found, default=-1)

    def next_phase(self) -> "Phase":
        self._next += 1
        return Phase(self, self._next - 1)

    @property
    def replaying(self) -> bool:
        """Still before the phase the earlier attempt stopped in: what runs now ran then."""
        return self._next - 1 < self.resume_phase

    def bind_log(self, log: list) -> None:
        """The run's log (a defense's history): saved with every checkpoint, restored from the
        phase the run resumes in."""
        self._log = log

    def clear(self) -> None:
        """The run finished: its checkpoints are not needed again."""
        if self.storage.exists(self.prefix):
            self.storage.delete(self.prefix)


@dataclass(frozen=True)
class Phase:
    """Phase ``index`` of a run: an ``engine.EpochCheckpoint``."""

    run: PhaseCheckpoints
    index: int

    @property
    def _stored(self) -> StoredCheckpoint:
        return StoredCheckpoint(self.run.storage, f"{self.run.prefix}/phase-{self.index}.pt")

    def load(self) -> dict | None:
        if self.index > self.run.resume_phase:
            return None
        state = self._stored.load()
        if state is not None and self.index == self.run.resume_phase and self.run._log is not None:
            self.run._log[:] = state.get("log", [])
        return state

    def save(self, state: dict) -> None:
        """Save ``state`` (``epoch``, ``epochs``, ``done`` and the loop's tensors) when it is due."""
        if not (state["done"] or state["epoch"] % self.run.every == 0):
            return
        self._stored.save({**state, "log": list(self.run._log) if self.run._log is not None else []})


@contextlib.contextmanager
def checkpointing(run: PhaseCheckpoints | None):
    """Within: every ``engine.train`` call (and every loop that asks :func:`next_phase`) is a
    checkpointed phase of ``run``; None turns checkpointing off for what runs within."""
    token = _ACTIVE.set(run)
    try:
        yield run
    finally:
        _ACTIVE.reset(token)


def next_phase() -> Phase | None:
    """The next phase of the run being checkpointed, or None when none is."""
    run = _ACTIVE.get()
    return run.next_phase() if run is not None else None


def replaying() -> bool:
    """Whether the run being checkpointed is replaying what an earlier attempt already did (and
    logged)."""
    run = _ACTIVE.get()
    return run is not None and run.replaying


def bind_log(log: list) -> None:
    """Bind the run's log to the run being checkpointed, if any."""
    run = _ACTIVE.get()
    if run is not None:
        run.bind_log(log)

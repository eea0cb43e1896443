"""Per-epoch training checkpoints kept in a sweep's storage (``trainables.storage``).

An attack stage trains for hours at paper scale; a node lost mid-way must cost only the epoch in
flight. ``engine.train`` saves its whole loop state after every epoch through one of these, and a
retried stage (Ray retries a task whose node died) finds it and goes on from there, on any node.
The state is read back with ``torch.load(weights_only=True)``: plain tensors and numbers only.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import torch

from trainables.storage import Storage


@dataclass(frozen=True)
class StoredCheckpoint:
    """One checkpoint object at ``key`` in ``storage`` (overwritten whole after every epoch)."""

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

    def clear(self) -> None:
        if self.storage.exists(self.key):
            self.storage.delete(self.key)

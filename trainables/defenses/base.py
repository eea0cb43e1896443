"""The defense contract.

A defense module defines ``Params`` (a frozen dataclass, paper defaults on every field) and a
class extending ``Defense`` decorated with ``@register_defense``; ``run(ctx)`` returns the
repaired (post-training) or newly trained (training-time) model.

The context never holds the test set. ``ctx.evaluate`` measures test BA/ASR/RA for the per-epoch
LOG only; a defense must not base any decision on it (selection uses the clean subset only).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
from torch import nn

from trainables.checkpoint import replaying
from trainables.data.base import ImageSet
from trainables.engine import Runtime


@dataclass
class DefenseContext:
    rt: Runtime
    seed: int
    num_classes: int
    # post-training: the suspicious model (the defense's own copy) and the clean subset
    model: nn.Module | None = None
    clean: ImageSet | None = None
    # training-time: the poisoned training set (poisoned labels)
    train: ImageSet | None = None
    # every defense: a fresh, seeded model of the suspicious model's architecture, or of the one
    # named (``build_model("wrn-16-4")``); a defense that returns another architecture than the
    # suspicious model's names it in ``output_model`` (the saved spec.json records it)
    build_model: Callable[..., nn.Module] | None = None
    output_model: str | None = None
    # logging only: test metrics of a model, and how well a suspected-poison set matches the truth
    evaluate: Callable[[nn.Module], dict] = lambda model: {}
    score_filter: Callable[[torch.Tensor], dict] = lambda index: {}
    # oracle for ablations only (NBA Table 5): the attack's trigger on a float batch
    oracle_trigger: Callable[[torch.Tensor], torch.Tensor] | None = None
    # post-training, for a defense whose method assumes two backdoored models (MCR's authors):
    # the suspicious model's attack stage trained again from another seed (``AttackStageSpec.twin``);
    # None where the suspicious model is no cached attack stage
    twin_model: Callable[[], nn.Module] | None = None
    report: Callable[[dict], None] = lambda logs: None
    progress: Callable[[str], None] = print
    history: list = field(default_factory=list)

    def log_epoch(self, stage: str, logs: dict, model: nn.Module | None = None) -> dict:
        """Record one epoch: the defense's own terms plus (if ``model``) test metrics for the
        log. Every defense calls this once per epoch; the stage forwards it to Tune/MLflow.
        A retried trial replaying what its earlier attempt logged logs nothing (the entries are
        in its restored history: ``trainables.checkpoint``).

        Args:
            stage: the phase of the defense the epoch belongs to (``"teacher"``, ``"nba"``, ...).
            logs: the epoch's own figures (losses, lr, ...), floats.
            model: the model to measure on the test subset for the log; None for no test metrics.

        Returns:
            The recorded entry: ``stage``, ``logs``, the test metrics and its ``step`` (1-based).
        """
        entry = {"stage": stage, **logs}
        if replaying():
            return entry
        if model is not None:
            entry.update(self.evaluate(model))
        entry["step"] = len(self.history) + 1
        self.history.append(entry)
        self.report(entry)
        shown = " ".join(f"{k}={v:.4g}" for k, v in entry.items()
                         if isinstance(v, float) and k not in ("seconds", "lr"))
        self.progress(f"[{stage}] step {entry['step']} {shown}")
        return entry


@dataclass(frozen=True)
class Cost:
    """What one run of a defense costs, for the sweep's ``--dry-run`` estimate."""

    passes: float              # images through a forward + backward pass
    logged_epochs: int         # epochs that evaluate the test subset for the log


class Defense:
    name: ClassVar[str]
    kind: ClassVar[str]                     # "post-training" | "training-time"
    Params: ClassVar[type]
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""

    def __init__(self, params):
        self.params = params

    @classmethod
    def cost(cls, params, n_images: int) -> Cost:
        """The cost of one run, for ``--dry-run``'s estimate. Every defense states its own.

        Args:
            params: the defense's ``Params``.
            n_images: the images it trains on: the clean subset, or the poisoned training set of
                a training-time defense.

        Returns:
            The images through forward + backward passes and the epochs that log test metrics.
        """
        raise NotImplementedError(f"defense {cls.name} does not state its cost")

    @classmethod
    def needs_twin_stage(cls, params: dict) -> bool:
        """Whether a run with these (fixed) parameters asks for ``DefenseContext.twin_model``: a
        sweep then trains the twin beside the attack stages, not inside a trial."""
        return False

    def run(self, ctx: DefenseContext) -> nn.Module:
        """Repair the suspicious model, or train a new one from the poisoned set.

        Args:
            ctx: ``ctx.model`` and ``ctx.clean`` for a post-training defense, ``ctx.train`` for a
                training-time one; logging (``ctx.log_epoch``) and a model factory
                (``ctx.build_model``). Never the test set.

        Returns:
            The defended model, in eval mode or not (the stage evaluates it in eval mode).
        """
        raise NotImplementedError  # every registered defense overrides this

"""The attack contract: which training images to poison, how to put the trigger on
any batch, an optional fitting step, and the tensors that make up the attack's state.

An attack module defines ``Params`` (a frozen dataclass extending ``AttackParams``, paper
defaults on every field) and a class extending ``Attack``, decorated with ``@register_attack``.
All images are float ``[0, 1]`` NCHW inside these methods; the stage stores results as uint8.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import nn

from trainables.data.base import Dataset, ImageSet
from trainables.data.loader import to_float, to_uint8
from trainables.engine import Runtime, SGDConfig
from trainables.params import param


@dataclass(frozen=True)
class AttackParams:
    """Parameters every attack has."""

    target: int = param(0, "target label (all-to-one)", low=0)
    poison_rate: float = param(0.1, "poisoned fraction of the whole training set", low=0.0, high=1.0)
    poison_seed: int = param(0, "seed of the poisoned-index draw and of any randomness in the trigger")


POISON_DRAWS = ("target-class", "whole-set")


@dataclass(frozen=True)
class CleanLabelParams(AttackParams):
    """Parameters every clean-label attack has: how many target-class images it poisons."""

    poison_rate: float = param(0.08, "poisoned fraction of the WHOLE training set, all from the target "
                                     "class (NBA Table 1: 0.08)", low=0.0, high=1.0)
    poison_draw: str = param("target-class", "target-class: rate·N target-class images | whole-set: draw "
                                             "rate·N images over the whole set and poison the target-class "
                                             "ones among them (~rate·N/classes; the NAD/ABL/ARGD code)",
                             choices=POISON_DRAWS)


@dataclass
class FitContext:
    """What an attack's fitting step may use."""

    rt: Runtime
    dataset: Dataset
    seed: int
    clean_model: Callable[[], nn.Module]      # a trained clean model of the same dataset/model (cached)
    progress: Callable[[str], None] = print


@dataclass
class PostTrainResult:
    """Extra outputs of an attack that goes on after training (CheatKD's distilled student)."""

    metrics: dict
    models: dict[str, tuple[nn.Module, dict]]   # name -> (model, model spec section)


class Attack:
    name: ClassVar[str]
    kind: ClassVar[str]                     # "poison-label" | "clean-label"
    Params: ClassVar[type] = AttackParams
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    needs_clean_model: ClassVar[bool] = False
    report_metrics: ClassVar[tuple[str, ...]] = ()   # metrics beyond BA/ASR/RA its stage reports

    @classmethod
    def extra_passes(cls, params, n_train: int) -> float:
        """Training passes (images through forward + backward) the attack adds to its stage's
        ``n_train x epochs``, for the sweep's cost estimate. Data-poisoning attacks add none."""
        return 0.0

    def __init__(self, params: AttackParams, dataset: Dataset):
        if params.target >= dataset.num_classes:
            raise ValueError(f"attack.target={params.target} but {dataset.name} has {dataset.num_classes} classes")
        self.params = params
        self.image_size = dataset.image_size
        self.num_classes = dataset.num_classes
        self.state: dict[str, torch.Tensor] = {}

    # -- 1. which training images ----------------------------------------------------------
    def select(self, labels: torch.Tensor) -> torch.Tensor:
        """Sorted indices of the training images to poison (seeded by ``poison_seed``).

        Args:
            labels: the training set's labels, one per image.

        Returns:
            A sorted 1-D index tensor into the training set.

        Poison-label attacks draw ``rate·N`` images among the non-target ones (relabelling a
        target image changes nothing); clean-label attacks draw only target-class images:
        ``rate·N`` of them (``poison_draw="target-class"``), or the target-class images among
        ``rate·N`` drawn over the whole set (``"whole-set"``, the draw of NAD's, ABL's and ARGD's
        reference code: NAD ``data_loader.py`` line 155 draws the permutation over the whole
        set, lines 226-236 trigger only the target-class images in it).
        """
        gen = torch.Generator().manual_seed(self.params.poison_seed)
        labels = labels.cpu()
        n = round(self.params.poison_rate * len(labels))
        if self.kind == "clean-label" and getattr(self.params, "poison_draw", "target-class") == "whole-set":
            drawn = torch.randperm(len(labels), generator=gen)[:n]
            return drawn[labels[drawn] == self.params.target].sort().values
        if self.kind == "clean-label":
            pool = torch.nonzero(labels == self.params.target).flatten()
        else:
            pool = torch.nonzero(labels != self.params.target).flatten()
        if n > len(pool):
            raise ValueError(f"{self.name}: poison_rate={self.params.poison_rate} asks for {n} images "
                             f"but only {len(pool)} are eligible ({self.kind})")
        return pool[torch.randperm(len(pool), generator=gen)[:n]].sort().values

    # -- 2. optional fitting (TrojanNN, CLA, CheatKD) -------------------------------------------
    def fit(self, ctx: FitContext, train: ImageSet, index: torch.Tensor) -> None:
        """Fit the trigger or perturbations; store what the trigger needs in ``self.state``.

        Args:
            ctx: the runtime, the dataset, the seed and a cached clean model of the same setting.
            train: the clean training set (uint8).
            index: the images ``select`` chose to poison.
        """

    def initial_model(self, ctx: FitContext) -> nn.Module | None:
        """The trained model the backdoored model starts from, or None for a fresh model from the
        stage's seed (every attack but CheatKD, whose teacher is the clean model trained on)."""
        return None

    def training_config(self, cfg: SGDConfig) -> SGDConfig:
        """The SGD config the backdoored model is trained with, given the stage's ``cfg``: ``cfg``
        itself for every attack but CheatKD (its ``teacher_lr``)."""
        return cfg

    # -- 3. the trigger ----------------------------------------------------------------------
    def apply(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Put the trigger on a batch (test time, and training by default).

        Args:
            x: float ``[0, 1]`` images, NCHW.
            generator: the seeded generator of any per-image randomness (Refool's reflections).

        Returns:
            The triggered batch, float ``[0, 1]``, the shape of ``x``.
        """
        raise NotImplementedError  # every registered attack overrides this

    def poison(self, x: torch.Tensor, index: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The training-set version of the trigger (CLA adds its adversarial perturbation
        first); the trigger itself by default.

        Args:
            x: float ``[0, 1]`` images, NCHW: the training images at ``index``.
            index: their indices in the training set.
            generator: as in ``apply``.

        Returns:
            The poisoned batch, float ``[0, 1]``, the shape of ``x``.
        """
        return self.apply(x, generator)

    def post_train(self, ctx: FitContext, model: nn.Module, model_spec: dict, train: ImageSet,
                   evaluate: Callable[[nn.Module], dict]) -> PostTrainResult | None:
        """Work after the backdoored model is trained (CheatKD distils its student here).

        ``model``: the trained backdoored model (on ``ctx.rt``'s device); ``model_spec``: its
        ``rundir.model_spec`` section (name, num_classes, mean, std); ``train``: the CLEAN
        training set, i.e. the original images with their original labels, no trigger and no
        relabelling (the rows that were poisoned appear in their clean form); ``evaluate(m)``:
        ``{"ba", "asr", "ra"}`` of a model on the test set. Returns extra metrics and models.
        """
        return None

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.state.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.state = dict(state)


def map_batches(fn, x_u8: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Apply a float-image function to uint8 images in batches; return uint8."""
    out = torch.empty_like(x_u8)
    for s in range(0, len(x_u8), batch_size):
        out[s:s + batch_size] = to_uint8(fn(to_float(x_u8[s:s + batch_size]), slice(s, s + batch_size)))
    return out


def poison_training_set(attack: Attack, train: ImageSet, index: torch.Tensor) -> tuple[ImageSet, torch.Tensor]:
    """(the poisoned training set, the poisoned images as uint8). Labels become the target for
    poison-label attacks; clean-label attacks never change a label."""
    gen = torch.Generator().manual_seed(attack.params.poison_seed + 1)
    sub = train.x[index]
    poisoned = map_batches(lambda xb, sl: attack.poison(xb, index[sl], gen), sub)
    x = train.x.clone()
    x[index] = poisoned
    y = train.y.clone()
    if attack.kind != "clean-label":
        y[index] = attack.params.target
    return ImageSet(x, y), poisoned


def triggered_test_set(attack: Attack, test: ImageSet) -> ImageSet:
    """Triggered copies of the NON-target test images with their TRUE labels (for ASR/RA)."""
    keep = torch.nonzero(test.y != attack.params.target).flatten()
    gen = torch.Generator().manual_seed(attack.params.poison_seed + 2)
    x = map_batches(lambda xb, sl: attack.apply(xb, gen), test.x[keep])
    return ImageSet(x, test.y[keep].clone())

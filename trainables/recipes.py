"""Named attack-training recipes: the complete ``SGDConfig`` a backdoored model is trained with.

A stage's ``train`` settings (a preset's ``budget.attack``, ``run --set train.recipe=...``) may
name one with ``recipe``; the recipe fills every training field and the other keys given beside
it override single fields (``{recipe: reference, epochs: 4}``). The stage's cache key holds the
expanded values, never the name, so two spellings of the same training are one stage.

* ``standard`` (our choice; ``SGDConfig``'s defaults): 100 epochs, lr 0.1 with cosine decay to
  zero, momentum 0.9, weight decay 5e-4, batch 128, random crop + flip, shuffled: the usual
  CIFAR training, ending fully annealed. No paper of NBA, DLP or CheatKD states its attacks'
  training; this is what the presets ran before a recipe was named.
* ``reference``: the attack training of ARGD's reference code (Xia et al., "Eliminating backdoor
  triggers for deep neural networks using attention relation graph distillation", IJCAI 2022;
  repository BililiCode/ARGD), whose README reports the undefended BadNets WRN-16-1 at
  80.08 BA / 100 ASR, the level of NBA Table 2's undefended row (80.02 / 99.83):
    - 9 epochs: ``train_badnet.py`` loops ``range(1, opt.epochs)`` with ``--epochs 10``
      (``config.py`` line 15);
    - lr 0.1 for six epochs, then 0.01 for three: ``train_badnet.py``'s
      ``_adjust_learning_rate`` (``epoch < 7``: lr; else ``0.1 * lr``); lr 0.1 at ``config.py``
      line 17;
    - SGD, momentum 0.9, weight decay 1e-4, Nesterov: ``config.py`` lines 18-19 and the optimiser
      in ``train_badnet.py`` (``nesterov=True``);
    - batch 64: ``config.py`` line 16;
    - no augmentation, no shuffling: ``data_loader.py``'s ``get_backdoor_loader``
      (``transforms.ToTensor()`` only, ``shuffle=False``), the loader ``train_badnet.py`` uses.
* ``reference-nad``: the attack training of NAD's reference code (Li et al., "Neural attention
  distillation: erasing backdoor triggers from deep neural networks", ICLR 2021; repository
  bboylyg/NAD), whose README reports 85.65 BA / 100 ASR:
    - 19 epochs at a constant lr 0.1: ``train_badnet.py`` line 128 loops ``range(1, opt.epochs)``
      with ``--epochs 20`` (``config.py`` line 15), and ``_adjust_learning_rate`` (line 158)
      keeps the lr below epoch 21;
    - momentum 0.9, weight decay 1e-4, Nesterov, batch 64: ``config.py`` lines 16-19,
      ``train_badnet.py`` lines 111-115;
    - no augmentation, no shuffling: ``data_loader.py`` lines 54-67 (``get_backdoor_loader``).

Which recipe each paper table implies, and the evidence, is in docs/results.md.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from trainables.engine import SGDConfig
from trainables.params import ParamError

RECIPES: dict[str, SGDConfig] = {
    "standard": SGDConfig(),
    "reference": SGDConfig(epochs=9, lr=0.1, batch_size=64, momentum=0.9, weight_decay=1e-4, nesterov=True,
                           schedule="piecewise", milestones=(6,), lr_values=(0.01,),
                           augment=False, shuffle=False),
    "reference-nad": SGDConfig(epochs=19, lr=0.1, batch_size=64, momentum=0.9, weight_decay=1e-4, nesterov=True,
                               schedule="constant", augment=False, shuffle=False),
}

RECIPE_SUMMARIES = {
    "standard": "100 epochs, lr 0.1 cosine, wd 5e-4, batch 128, crop + flip, shuffled (our choice)",
    "reference": "ARGD's code: 9 epochs, lr 0.1 (0.01 from epoch 7), Nesterov, wd 1e-4, batch 64, "
                 "no augmentation, no shuffling",
    "reference-nad": "NAD's code: 19 epochs at lr 0.1, Nesterov, wd 1e-4, batch 64, no augmentation, "
                     "no shuffling",
}


def recipe_fields(name: str) -> dict[str, Any]:
    """The complete ``SGDConfig`` fields of recipe ``name``."""
    if name not in RECIPES:
        raise ParamError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
    return dataclasses.asdict(RECIPES[name])


def expand_recipe(train: dict[str, Any], where: str = "train") -> dict[str, Any]:
    """``train`` with its ``recipe`` key (if any) replaced by the recipe's fields; the keys given
    beside it win. Without ``recipe`` it is returned unchanged (a copy)."""
    train = dict(train)
    name = train.pop("recipe", None)
    if name is None:
        return train
    if not isinstance(name, str):
        raise ParamError(f"{where}.recipe: expected a recipe name, got {name!r}; known: {', '.join(RECIPES)}")
    try:
        fields = recipe_fields(name)
    except ParamError as e:
        raise ParamError(f"{where}.recipe: {e}") from None
    return {**fields, **train}

"""Attack-training recipes (``trainables.recipes``) and the data-feeding switches they set:
the recipe fills every training field, keys beside it win, the stage key holds the values (not
the name), and ``augment``/``shuffle`` change what the loop feeds the model."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from trainables.data.base import ImageSet
from trainables.data.loader import to_float
from trainables.engine import SGDConfig, pick_runtime, train
from trainables.params import ParamError, make_params
from trainables.recipes import RECIPES, expand_recipe, recipe_fields
from trainables.stages import resolve_attack_stage


def test_a_recipe_fills_every_field_and_keys_beside_it_win():
    got = expand_recipe({"recipe": "reference", "epochs": 4})
    assert got == {**dataclasses.asdict(RECIPES["reference"]), "epochs": 4}
    assert got["augment"] is False and got["shuffle"] is False and got["nesterov"] is True
    assert expand_recipe({"epochs": 3}) == {"epochs": 3}


def test_the_reference_recipes_hold_the_reference_codes_values():
    argd, nad = RECIPES["reference"], RECIPES["reference-nad"]
    assert [argd.lr_at(e) for e in range(argd.epochs)] == [0.1] * 6 + [0.01] * 3
    assert [nad.lr_at(e) for e in range(nad.epochs)] == [0.1] * 19
    for r in (argd, nad):
        assert (r.batch_size, r.momentum, r.weight_decay, r.nesterov, r.augment, r.shuffle) == \
            (64, 0.9, 1e-4, True, False, False)
    assert recipe_fields("standard") == dataclasses.asdict(SGDConfig())


@pytest.mark.parametrize("train, message", [
    ({"recipe": "fast"}, "train.recipe: unknown recipe 'fast'; known: standard, reference, reference-nad"),
    ({"recipe": 3}, "train.recipe: expected a recipe name"),
])
def test_a_bad_recipe_is_named(train, message):
    with pytest.raises(ParamError, match=message):
        resolve_attack_stage("synthetic", "wrn-16-1", "badnets", train=train)


def test_the_stage_key_holds_the_values_not_the_name():
    by_name = resolve_attack_stage("synthetic", "wrn-16-1", "badnets", train={"recipe": "reference"})
    spelled = resolve_attack_stage("synthetic", "wrn-16-1", "badnets",
                                   train=dataclasses.asdict(RECIPES["reference"]))
    assert by_name.hash() == spelled.hash()
    assert "recipe" not in by_name.train
    # the data feeding enters the key only when it departs from crop + flip, shuffled
    plain = resolve_attack_stage("synthetic", "wrn-16-1", "badnets", train={"epochs": 2})
    explicit = resolve_attack_stage("synthetic", "wrn-16-1", "badnets",
                                    train={"epochs": 2, "augment": True, "shuffle": True})
    off = resolve_attack_stage("synthetic", "wrn-16-1", "badnets", train={"epochs": 2, "augment": False})
    assert plain.hash() == explicit.hash() != off.hash()
    assert "augment" not in plain.key()["train"] and off.key()["train"]["augment"] is False


class _Probe(torch.nn.Module):
    """A linear model whose loss records what each batch held."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3 * 8 * 8, 2)

    def forward(self, x):
        return self.lin(x.flatten(1))


@pytest.mark.parametrize("shuffle, augment", [(False, False), (True, True)])
def test_shuffle_and_augment_change_what_the_loop_feeds(shuffle, augment):
    gen = torch.Generator().manual_seed(0)
    data = ImageSet(torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8, generator=gen),
                    torch.randint(0, 2, (40,), generator=gen))
    seen, exact = [], []

    def loss_fn(model, x, y, idx):
        seen.append(idx.cpu())
        exact.append(torch.equal(x.float().cpu(), to_float(data.x[idx.cpu()])))
        return torch.nn.functional.cross_entropy(model(x.float()), y), {}

    rt = dataclasses.replace(pick_runtime("cpu", amp=False), channels_last=False)
    cfg = SGDConfig(epochs=2, lr=0.01, batch_size=10, shuffle=shuffle, augment=augment)
    train(_Probe(), data, cfg, rt, seed=0, loss_fn=loss_fn)
    order = torch.cat(seen)
    first, second = order[:40], order[40:]
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(40))   # every image, once an epoch
    assert torch.equal(first, second) is (not shuffle)          # off: one order, read the same way each epoch
    assert not torch.equal(first, torch.arange(40))             # never the stored (e.g. class-sorted) order
    assert all(exact) is (not augment)


def test_a_preset_names_a_recipe_and_its_attacks_train_with_it():
    from sweep.config import load_preset

    cfg = load_preset("nba_table2", ["profile=reference"])
    for entry in cfg.attacks:
        assert make_params(SGDConfig, dict(entry.train)) == RECIPES["reference"], entry.name
    cpu = {a.name: make_params(SGDConfig, dict(a.train)) for a in load_preset("nba_table2", ["profile=cpu"]).attacks}
    assert cpu["badnets"] == dataclasses.replace(RECIPES["standard"], epochs=12)


def test_a_preset_with_an_unknown_recipe_is_refused_with_its_key():
    from sweep.errors import ConfigError
    from sweep.config import load_preset

    with pytest.raises(ConfigError, match=r"budget.attack.recipe: unknown recipe 'slow'"):
        load_preset("nba_table2", ["budget.attack.recipe=slow"])
    with pytest.raises(ConfigError, match=r"attacks.badnets.budget.recipe: unknown recipe"):
        load_preset("nba_table2", ["attacks.badnets.budget={recipe: nad}"])

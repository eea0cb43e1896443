"""Every registered attack and defense against its search space (``search_spaces/<name>.yaml``,
or the file a plugin method names with ``search_space_file``).

A sweep's first trial is each method's paper default and every other trial is a point of the
space's ranges, turned into the method's ``Params`` by ``make_params``. So for every method: the
file exists and names the method and its kind; each parameter ``load_space`` returns is a field
of ``Params``, with the field's default as its default; the range contains that default; and the
range's ends (or every choice) are values ``make_params`` accepts.
"""
from __future__ import annotations

import dataclasses

import pytest
import yaml

from sweep.config import load_space, space_file, spaces_dir
from trainables.params import make_params
from trainables.registry import attacks, defenses

METHODS = {**{name: ("attack", cls) for name, cls in attacks().items()},
           **{name: ("defense", cls) for name, cls in defenses().items()}}


def test_attack_and_defense_names_do_not_collide():
    assert not set(attacks()) & set(defenses())


def test_every_space_file_belongs_to_a_registered_method():
    files = {p.stem for p in spaces_dir().glob("*.yaml")}
    assert files, f"no search-space files in {spaces_dir()}"
    assert not files - set(METHODS), f"space files without a registered method: {sorted(files - set(METHODS))}"


def _plain(value):
    """A value as a sweep hands it to ``make_params`` (tuple choices travel as lists)."""
    return list(value) if isinstance(value, tuple) else value


@pytest.mark.parametrize("name", sorted(METHODS))
def test_search_space_matches_params(name):
    kind, cls = METHODS[name]
    path = space_file(name)
    assert path is not None, f"registered {kind} {name!r} has no search space ({spaces_dir() / name}.yaml)"
    raw = yaml.safe_load(path.read_text())
    assert (raw.get("method"), raw.get("kind")) == (name, kind), f"{path.name}: method/kind"
    space = load_space(name)
    assert space, f"{path.name} names no parameter"
    fields = {f.name: f for f in dataclasses.fields(cls.Params)}
    for key, dist in space.items():
        where = f"{path.name} {key}"
        assert key in fields, f"{where}: not a field of {cls.__name__}.Params"
        default = fields[key].default
        assert default is not dataclasses.MISSING, f"{where}: the Params field has no default"
        assert dist.default == default, f"{where}: default {dist.default!r} != Params default {default!r}"
        assert type(dist.default) is type(default) or {type(dist.default), type(default)} <= {int, float}, \
            f"{where}: default {dist.default!r} has another type than the Params default {default!r}"
        if dist.type == "categorical":
            assert default in dist.choices, f"{where}: default {default!r} not among the choices {dist.choices}"
            values = list(dist.choices)
        else:
            assert dist.low <= default <= dist.high, f"{where}: default {default!r} outside [{dist.low}, {dist.high}]"
            values = [dist.low, dist.high]
        for value in values:
            made = make_params(cls.Params, {key: _plain(value)}, where=f"{where}={value!r}: ")
            assert getattr(made, key) == value, f"{where}: make_params turned {value!r} into {getattr(made, key)!r}"

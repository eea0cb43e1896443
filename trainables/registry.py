"""Method registries: adding an attack or defense is one module plus one search-space YAML.

Each method module decorates its class with ``@register_attack`` / ``@register_defense``; the
packages ``trainables.attacks`` and ``trainables.defenses`` import every module they contain, so
the CLI, ``list``, the sweep and the docs discover new methods without edits elsewhere. Methods
from outside the tree come from plugins (``trainables.plugins``), loaded with the built-in ones.
"""
from __future__ import annotations

import importlib
import pkgutil

_ATTACKS: dict[str, type] = {}
_DEFENSES: dict[str, type] = {}


def register_attack(cls):
    _ATTACKS[cls.name] = cls
    return cls


def register_defense(cls):
    _DEFENSES[cls.name] = cls
    return cls


def _discover(package: str) -> None:
    pkg = importlib.import_module(package)
    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.name.startswith("_") and info.name != "base":
            importlib.import_module(f"{package}.{info.name}")


def _discover_all() -> None:
    from trainables import plugins

    _discover("trainables.attacks")
    _discover("trainables.defenses")
    plugins.load()


def attacks() -> dict[str, type]:
    _discover_all()
    return dict(sorted(_ATTACKS.items()))


def defenses() -> dict[str, type]:
    _discover_all()
    return dict(sorted(_DEFENSES.items()))


def get_attack(name: str) -> type:
    known = attacks()
    if name not in known:
        raise KeyError(f"unknown attack {name!r}; known: {', '.join(known)}")
    return known[name]


def get_defense(name: str) -> type:
    known = defenses()
    if name not in known:
        raise KeyError(f"unknown defense {name!r}; known: {', '.join(known)}")
    return known[name]

"""Plugins: modules that extend backdoor-sweep from outside its source tree.

A plugin is an importable module. Importing it may register attacks and defenses (with
``trainables.registry.register_attack`` / ``register_defense``; a method from outside the tree
names its search-space YAML with a ``search_space_file`` class attribute) and trial hooks
(``register_trial_hook``): functions called with a ``TrialCase`` and the trial's output folder
before each trial runs, e.g. to check a site policy, or, in this project's tests, to make chosen
trials fail.

Plugins are found in two places: the Python entry-point group ``backdoor_sweep.plugins`` of
installed packages, and the comma-separated module list in ``SWEEP_PLUGINS``. The driver passes
its list to every trial (``TrialJob.plugins``), so Ray workers load the same plugins without
needing the driver's environment.
"""
from __future__ import annotations

import importlib
import os
from importlib.metadata import entry_points
from typing import Callable

ENTRY_POINT_GROUP = "backdoor_sweep.plugins"
ENV = "SWEEP_PLUGINS"

class PluginError(ImportError):
    """A configured plugin module cannot be imported; the message names it."""


_TRIAL_HOOKS: list[Callable] = []
_LOADED: set[str] = set()


def register_trial_hook(fn: Callable) -> Callable:
    """``fn(case, out_dir)`` runs before every trial; raising fails that trial alone."""
    if fn not in _TRIAL_HOOKS:
        _TRIAL_HOOKS.append(fn)
    return fn


def configured() -> tuple[str, ...]:
    """The plugin modules this process is configured with (entry points, then ``SWEEP_PLUGINS``)."""
    names = [ep.value.split(":")[0] for ep in entry_points(group=ENTRY_POINT_GROUP)]
    names += [m.strip() for m in os.environ.get(ENV, "").split(",") if m.strip()]
    return tuple(dict.fromkeys(names))


def load(modules: tuple[str, ...] | None = None) -> None:
    """Import each plugin module once (``None``: the configured ones)."""
    for name in configured() if modules is None else modules:
        if name not in _LOADED:
            try:
                importlib.import_module(name)
            except ImportError as e:
                raise PluginError(f"plugin {name!r} (from {ENV} or the {ENTRY_POINT_GROUP!r} entry points) "
                                  f"cannot be imported: {e}") from e
            _LOADED.add(name)


def run_trial_hooks(case, out_dir) -> None:
    for fn in list(_TRIAL_HOOKS):
        fn(case, out_dir)

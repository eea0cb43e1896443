"""What makes two trial configurations the same: every parameter of the method, defaults filled in,
as canonical JSON; its short hash is the ``config_key`` that runs are tagged with and that
selection, cross-checks and the report group by."""
from __future__ import annotations

import hashlib
import json


def config_json(params: dict) -> str:
    """Canonical text of a full parameter set (exact values; the key configs are compared by)."""
    return json.dumps(params, sort_keys=True, separators=(",", ":"), default=list)


def config_key(params: dict) -> str:
    return hashlib.sha1(config_json(params).encode()).hexdigest()[:10]


def full_defense_params(defense: str, params: dict) -> dict:
    """Every parameter of the defense (defaults filled in), as the trial runs it."""
    from trainables.stages import resolve_defense

    return resolve_defense(defense, params).params


def full_attack_params(attack: str, params: dict) -> dict:
    """Every parameter of the attack (defaults filled in), as the trial runs it."""
    from trainables import registry
    from trainables.params import as_dict, make_params

    return as_dict(make_params(registry.get_attack(attack).Params, params))

"""What a sweep is: a preset YAML (+ a profile, + ``--set`` overrides) checked into a frozen ``SweepConfig``.
Holds the schema, the checks, the search spaces, the paper-default first trial, the papers' tables
and what makes two trial configurations the same. Imports no other layer of ``sweep``."""
from __future__ import annotations

from sweep.config._identity import config_json, config_key, full_attack_params, full_defense_params
from sweep.config._paper_tables import PaperTable, known_tables, load_table
from sweep.config._preset import (PRESETS_DIR, absolute_paths, config_with, list_presets, load_preset, preset_path,
                                  rebuild_config)
from sweep.config._spaces import Dist, SpaceError, first_trial, load_space, optuna_point, optuna_space, space_file, spaces_dir
from sweep.config._sweep_config import (DEFENSE_METRICS, STAGE_SEED_STRIDE, AttackEntry, DefenseEntry, EarlyStopping,
                                        RayConfig, Resources, SearchConfig, Selection, StorageConfig, SweepConfig,
                                        format_config, stage_seed)

__all__ = ["AttackEntry", "DEFENSE_METRICS", "DefenseEntry", "Dist", "EarlyStopping", "PRESETS_DIR", "PaperTable",
           "RayConfig", "Resources", "STAGE_SEED_STRIDE", "SearchConfig", "Selection", "SpaceError", "StorageConfig", "SweepConfig",
           "absolute_paths", "config_json", "config_key", "config_with", "first_trial", "format_config",
           "full_attack_params", "full_defense_params", "known_tables", "list_presets", "load_preset", "load_space",
           "load_table", "optuna_point", "optuna_space", "preset_path", "rebuild_config", "space_file", "spaces_dir", "stage_seed"]

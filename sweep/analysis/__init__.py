"""What a sweep found, read back after it ran: selection (Pareto fronts, the best configuration
per attack and across attacks, as ``BestConfigs``), the report's tables and plots in a paper's
layout, the report over seeds and ``replicate``. Reads the config and the tracking; no Ray."""
from __future__ import annotations

from sweep.analysis._best_configs import AcrossAttacks, BestConfigs, Chosen, DefenseResult, PairResult
from sweep.analysis._replicate import replication_config
from sweep.analysis._report import Report, layout_section, make_report, make_seeds_report
from sweep.analysis._selection import (best_across_attacks, build_best_configs, choose, describe_rule, pareto_front,
                                       select_best)
from sweep.analysis._tables import aggregate_seeds, best_against_default, tables_markdown

__all__ = ["AcrossAttacks", "BestConfigs", "Chosen", "DefenseResult", "PairResult", "Report", "aggregate_seeds",
           "best_across_attacks", "best_against_default", "build_best_configs", "choose", "describe_rule",
           "layout_section", "make_report", "make_seeds_report", "pareto_front", "replication_config",
           "select_best", "tables_markdown"]

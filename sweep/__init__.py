"""Orchestration: the CLI, presets, planning, Ray Tune + Optuna, MLflow tracking, best-config
selection, reports and benchmarks. Depends on ``trainables``; never the other way round."""

"""Search spaces: one YAML file per method (its tunable parameters as Optuna distributions and
its paper defaults). Data only; loaded by ``sweep``."""
from pathlib import Path

DIR = Path(__file__).parent


def path(method: str) -> Path:
    return DIR / f"{method}.yaml"

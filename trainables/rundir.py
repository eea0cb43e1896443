"""Output directories: ``model.pt`` (plain state_dict), ``spec.json``, ``metrics.json``.

Every stage (clean training, attack, defense) writes the same three files, so a user can always
rebuild what a run produced with ``trainables.load_model(DIR)``. Checkpoints are loaded with
``torch.load(weights_only=True)`` only: this tool loads models of unknown origin by design.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainables.models import build_model


class CheckpointError(RuntimeError):
    """A model directory or checkpoint is missing, unreadable or inconsistent with its spec."""


def model_spec(name: str, num_classes: int, mean, std) -> dict:
    """The ``model`` section of spec.json: everything ``build_model`` needs."""
    return {"name": name, "num_classes": int(num_classes), "mean": list(map(float, mean)), "std": list(map(float, std))}


def _json_default(o: Any):
    if isinstance(o, (Path,)):
        return str(o)
    if torch.is_tensor(o):
        return o.tolist()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def _clean_json(o: Any):
    """NaN/inf -> None so the files stay strict JSON."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _clean_json(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean_json(v) for v in o]
    return o


def dump_json(obj: Any, path: Path) -> None:
    """Write JSON atomically (temp file, then rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(_clean_json(obj), f, indent=2, default=_json_default)
        f.write("\n")
    os.replace(tmp, path)


def write_run_dir(out: str | Path, model: nn.Module, spec: dict, metrics: dict,
                  extra: dict[str, Any] | None = None) -> Path:
    """Write the three standard files (plus ``extra``: name -> tensor dict or bytes) into ``out``.

    Everything is written into a staging folder first and moved in file by file, so a crash
    never leaves a half-written checkpoint under its final name.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out, prefix=".staging-"))
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        torch.save(state, stage / "model.pt")
        for name, value in (extra or {}).items():
            if isinstance(value, (bytes, bytearray)):
                (stage / name).write_bytes(value)
            else:
                torch.save(value, stage / name)
        dump_json(spec, stage / "spec.json")
        dump_json(metrics, stage / "metrics.json")
        for f in stage.iterdir():
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out


def read_json(path: str | Path, what: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{what} {path} is not valid JSON: {e}") from None


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A plain tensor state_dict, never unpickling code (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses anything that is not plain tensors/containers
        raise CheckpointError(f"cannot load {path} as a plain state_dict (weights_only=True): {e}") from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"{path} is not a state_dict of tensors")
    return state


def build_from_spec(model_section: dict, where: str = "spec.json") -> nn.Module:
    try:
        return build_model(model_section["name"], int(model_section["num_classes"]),
                           mean=tuple(model_section["mean"]), std=tuple(model_section["std"]))
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{where}: the 'model' section needs name, num_classes, mean, std ({e})") from None


def load_model_file(weights: str | Path, spec_path: str | Path) -> nn.Module:
    """Rebuild a model from a spec.json (its ``model`` section) and a state_dict file."""
    spec = read_json(spec_path, "model spec")
    if "model" not in spec:
        raise CheckpointError(f"{spec_path} has no 'model' section")
    model = build_from_spec(spec["model"], str(spec_path))
    try:
        model.load_state_dict(load_state_dict(weights))
    except RuntimeError as e:
        raise CheckpointError(f"{weights} does not match the model in {spec_path}: {str(e).splitlines()[0]}") from None
    return model.eval()


def load_model(run_dir: str | Path) -> nn.Module:
    """The model an output directory holds, in eval mode, taking ``[0, 1]`` pixel input."""
    run_dir = Path(run_dir)
    return load_model_file(run_dir / "model.pt", run_dir / "spec.json")

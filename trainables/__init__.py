"""Experiment code that a trial runs: data, models, the training engine, metrics, attacks,
defenses and the Ray Tune trainables. Nothing here imports ``sweep``."""


def load_model(run_dir):
    """The model an output directory (``model.pt`` + ``spec.json``) holds, in eval mode."""
    from trainables.rundir import load_model as _load
    return _load(run_dir)


def load_model_file(weights, spec_path):
    """A model from a state_dict file and a spec.json, in eval mode."""
    from trainables.rundir import load_model_file as _load
    return _load(weights, spec_path)


__all__ = ["load_model", "load_model_file"]

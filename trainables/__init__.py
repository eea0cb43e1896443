"""Experiment code that a trial runs: data, models, the training engine, metrics, attacks,
defenses and the Ray Tune trainables. Nothing here imports ``sweep``."""


def load_model(source, tracking_uri: str | None = None):
    """The model an output directory (``model.pt`` + ``spec.json``) holds, in eval mode.

    ``source`` may also be a Model Registry URI, ``models:/<name>@<alias>`` or
    ``models:/<name>/<version>`` (e.g. ``models:/quickstart-nba@best``, what a sweep registers):
    its files are downloaded from the tracking server or store (``tracking_uri``, else
    ``MLFLOW_TRACKING_URI``) and loaded the same way, weights only.

    Args:
        source: an output directory (``str`` or ``Path``) or a ``models:/`` URI.
        tracking_uri: the MLflow tracking URI of a ``models:/`` source (e.g.
            ``sqlite:///sweep-runs/mlflow.db``); None: ``MLFLOW_TRACKING_URI``.

    Returns:
        The ``torch.nn.Module`` in eval mode, on the CPU, taking ``[0, 1]`` pixels (its
        normalisation is its first layer).

    Raises:
        trainables.rundir.CheckpointError: missing or mismatched ``model.pt`` / ``spec.json``.
        ValueError: a registered version whose files are not stored in a run.
    """
    from trainables.rundir import load_model as _load

    if str(source).startswith("models:/"):
        import tempfile

        from mlflow import MlflowClient

        name, sep, alias = str(source)[len("models:/"):].partition("@")
        client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        if sep:
            version = client.get_model_version_by_alias(name, alias)
        else:
            name, _, number = name.partition("/")
            version = client.get_model_version(name, number)
        prefix = f"runs:/{version.run_id}/"
        if not version.source.startswith(prefix):
            raise ValueError(f"{source}: version {version.version} is not stored in a run ({version.source})")
        with tempfile.TemporaryDirectory() as tmp:
            return _load(client.download_artifacts(version.run_id, version.source[len(prefix):], tmp))
    return _load(source)


def load_model_file(weights, spec_path):
    """A model from a state_dict file and a spec.json, in eval mode.

    Args:
        weights: a ``state_dict`` file (loaded with ``weights_only=True``).
        spec_path: the ``spec.json`` that names the architecture and its normalisation.

    Returns:
        The ``torch.nn.Module`` in eval mode, on the CPU.

    Raises:
        trainables.rundir.CheckpointError: a file that is missing, not a state_dict, or not this model's.
    """
    from trainables.rundir import load_model_file as _load
    return _load(weights, spec_path)


__all__ = ["load_model", "load_model_file"]

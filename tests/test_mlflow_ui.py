"""The MLflow UI a researcher opens: a reduced quickstart sweep (real Ray, real MLflow), then
``tools/mlflow_screenshot.py`` starts ``mlflow ui`` on 127.0.0.1 over its store and opens the link
the sweep prints in headless Chromium. What the page shows is read from its DOM: the runs, lowest
ASR first, with BA, ASR, RA, DER and the searched parameters as columns, in the UI's model-training
mode (no GenAI sidebar). Skips without Chromium, its driver or the ``selenium`` package.
"""
import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")   # loopback only

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
# the quickstart preset cut to seconds: a small synthetic set, one attack, 1-epoch defenses
TINY = ["dataset=synthetic:400:200", "attacks=[badnets]", "budget.attack={epochs: 2, batch_size: 64}",
        "budget.defense_epochs=1", "budget.epoch_eval_size=100", "clean_fraction=0.1",
        "defenses.nba.params={teacher_epochs: 1, pgd_steps: 1}", "search.num_samples=2",
        "defenses.ft.num_samples=1", "ray.num_cpus=2", "ray.object_store_mb=100"]
METRIC_COLUMNS = ["metrics.`ba`", "metrics.`asr`", "metrics.`ra`", "metrics.`der`"]


def _screenshot_tool():
    spec = importlib.util.spec_from_file_location("mlflow_screenshot", ROOT / "tools" / "mlflow_screenshot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _number(text):
    """A metric cell's value ('-' where the run has none: nan)."""
    return math.nan if text in ("", "-") else float(text.rstrip("%"))


def _run_name(cell):
    return cell.splitlines()[-1].strip()        # the cell shows the run's colour swatch first


def test_the_sweeps_link_opens_its_runs_sorted_by_asr_with_the_metrics_and_params_as_columns(tmp_path):
    pytest.importorskip("selenium")
    tool = _screenshot_tool()
    if tool.find_browser() is None:
        pytest.skip("Chromium or chromedriver is not installed")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("MLFLOW_TRACKING_URI", None)
    sets = [arg for s in TINY for arg in ("--set", s)]
    done = subprocess.run([sys.executable, "-m", "sweep", "quickstart", *sets, "--workdir", str(tmp_path / "w")],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    links = re.findall(r"http://127\.0\.0\.1:\d+/#/\S*viewStateShareKey=\S*", done.stdout)
    assert links, "the sweep prints the link to its runs view"

    table = tool.capture(tmp_path / "w", tmp_path / "runs.png", link=links[0])

    assert (tmp_path / "runs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert table["url"].endswith(links[0].split("/#/")[1])      # the very view the sweep links to
    # model training, not GenAI: the sidebar offers runs and the registry, not traces' sessions or judges
    assert {"Runs", "Model registry"} <= set(table["sidebar"]), table["sidebar"]
    assert not {"Sessions", "Judges", "Prompts"} & set(table["sidebar"]), table["sidebar"]
    ids = [c["id"] for c in table["columns"]]
    assert set(METRIC_COLUMNS) <= set(ids)
    assert {"params.`lr`", "params.`lambda1`"} <= set(ids)      # NBA's searched parameters
    headers = {c["id"]: c["text"].lower() for c in table["columns"]}
    assert [headers[c] for c in METRIC_COLUMNS] == ["ba", "asr", "ra", "der"]

    from mlflow import MlflowClient
    client = MlflowClient(f"sqlite:///{tmp_path / 'w' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    stored = {r.info.run_name: r.data.metrics.get("asr", math.nan) for r in runs}
    assert len(stored) == 5                                     # the sweep, its attack stage, 2 NBA, 1 FT
    assert table["matching_runs"] == len(table["rows"]) == len(stored)
    shown = [(_run_name(row["attributes.`Run Name`"]), _number(row["metrics.`asr`"])) for row in table["rows"]]
    assert {name for name, _ in shown} == set(stored)
    for name, asr in shown:                                     # each cell is the run's own ASR
        assert asr == pytest.approx(stored[name], rel=1e-6) or (math.isnan(asr) and math.isnan(stored[name]))
    with_asr = [asr for _, asr in shown if not math.isnan(asr)]
    assert len(with_asr) == 4 and with_asr == sorted(with_asr)  # lowest ASR first
    assert all(math.isnan(asr) for _, asr in shown[len(with_asr):])   # the sweep's own run (no ASR) last
    for row in table["rows"]:                                   # BA, RA, DER of the trials are numbers
        if _run_name(row["attributes.`Run Name`"]).startswith(("nba/", "ft/")):
            assert all(not math.isnan(_number(row[c])) for c in METRIC_COLUMNS)

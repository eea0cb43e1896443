"""The command line: list, train, run (attack stage, cache, defense), clear errors."""
import json
import re
import subprocess
import sys

import pytest
import torch

from sweep.cli import main
from trainables import load_model

TINY_TRAIN = ["--set", "train.epochs=2", "--set", "train.lr=0.05", "--eval-size", "200"]


def run_cli(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help_through_the_module_entry_point():
    r = subprocess.run([sys.executable, "-m", "sweep", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    for word in ("list", "train", "run", "report", "bench", "preset"):
        assert word in r.stdout


def test_list_shows_every_kind_of_thing(capsys):
    code, out, _ = run_cli(["list"], capsys)
    assert code == 0
    for name in ("synthetic", "imagefolder:<path>", "cifar10", "wrn-16-1", "preact-resnet18", "badnets", "nba"):
        assert name in out
    assert "poison_rate" in out       # attack parameters with defaults


def test_train_writes_the_three_files(tmp_path, capsys):
    out = tmp_path / "clean"
    code, stdout, _ = run_cli(["train", "--dataset", "synthetic:600:200", "--model", "wrn-16-1", "--epochs", "2",
                               "--out", str(out), "--eval-size", "100"], capsys)
    assert code == 0, stdout
    assert "epoch 2/2" in stdout       # progress as it goes
    metrics = json.loads((out / "metrics.json").read_text())
    spec = json.loads((out / "spec.json").read_text())
    assert 0 <= metrics["ba"] <= 1 and metrics["images_per_second"] > 0 and metrics["train_seconds"] > 0
    assert spec["model"]["name"] == "wrn-16-1" and spec["model"]["num_classes"] == 10
    assert spec["dataset"] == "synthetic:600:200"
    model = load_model(out)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert all(torch.is_tensor(v) for v in torch.load(out / "model.pt", weights_only=True).values())


@pytest.mark.parametrize("args, message", [
    (["train", "--dataset", "synthetic", "--model", "wrn-15-1", "--out", "X"], "unknown model 'wrn-15-1'"),
    (["train", "--dataset", "cifar11", "--out", "X"], "unknown dataset 'cifar11'"),
    (["train", "--dataset", "synthetic", "--set", "train.lrr=0.1", "--out", "X"], "unknown parameter 'lrr'"),
    (["train", "--dataset", "synthetic", "--set", "train.epochs=-1", "--out", "X"], "epochs"),
    (["run", "--dataset", "synthetic", "--attack", "badnetz", "--out", "X"], "unknown attack 'badnetz'"),
    (["run", "--dataset", "synthetic", "--attack", "badnets", "--set", "attack.poison_rate=1.5", "--out", "X"],
     "poison_rate=1.5 is above its maximum"),
    (["run", "--dataset", "synthetic", "--attack", "badnets", "--defense", "nope", "--out", "X"], "unknown defense 'nope'"),
    (["run", "--dataset", "synthetic", "--attack", "badnets", "--set", "foo.bar=1", "--out", "X"], "unknown section 'foo'"),
    (["train", "--dataset", "imagefolder:/nonexistent/folder", "--out", "X"], "/nonexistent/folder"),
])
def test_bad_input_is_one_clear_message_and_no_output(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(args, capsys)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "X").exists()


def test_a_diverging_defense_ends_in_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    """NBA at lr 1e6 blows the student up in its first epoch: one error line, no traceback, no
    output folder."""
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(["run", "--dataset", "synthetic:200:100", "--attack", "badnets", "--set", "train.epochs=1",
                            "--eval-size", "50", "--cache", str(tmp_path / "cache"), "--defense", "nba",
                            "--set", "defense.lr=1e6", "--set", "defense.teacher_epochs=0",
                            "--set", "defense.pgd_steps=0", "--set", "defense.epochs=1",
                            "--set", "defense.clean_fraction=0.5", "--out", "X"], capsys)
    assert code == 2
    assert re.match(r"error: defense nba diverged: .*loss is (nan|inf)", err) and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "X").exists()


@pytest.mark.slow
def test_run_attack_then_defense_through_the_cache(tmp_path, capsys):
    cache = tmp_path / "cache"
    common = ["run", "--dataset", "synthetic", "--model", "wrn-16-1", "--attack", "badnets", "--cache", str(cache),
              *TINY_TRAIN]
    code, out1, _ = run_cli([*common, "--out", str(tmp_path / "atk")], capsys)
    assert code == 0
    spec = json.loads((tmp_path / "atk" / "spec.json").read_text())
    assert spec["attack"]["name"] == "badnets" and spec["attack"]["params"]["poison_rate"] == 0.1
    assert spec["target"] == 0 and spec["poison_index_file"] == "poison.pt"
    poison = torch.load(tmp_path / "atk" / "poison.pt", weights_only=True)
    assert len(poison["index"]) == 300 and poison["x"].dtype == torch.uint8
    assert (tmp_path / "atk" / "samples.png").read_bytes()[:4] == b"\x89PNG"
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 1

    code, out2, _ = run_cli([*common, "--defense", "ft", "--set", "defense.epochs=1", "--out", str(tmp_path / "def")],
                            capsys)
    assert code == 0
    assert "cached" in out2 and "epoch 1/2" not in out2       # the attack stage was not trained again
    m = json.loads((tmp_path / "def" / "metrics.json").read_text())
    assert set(m["before"]) >= {"ba", "asr", "ra"} and set(m["after"]) >= {"ba", "asr", "ra"}
    assert 0 <= m["der"] <= 1 and len(m["history"]) >= 1
    dspec = json.loads((tmp_path / "def" / "spec.json").read_text())
    assert dspec["defense"]["name"] == "ft" and dspec["defense"]["clean_fraction"] == 0.05
    assert load_model(tmp_path / "def")(torch.rand(1, 3, 32, 32)).shape == (1, 10)

    # a user's own model file defended the same way
    code, out3, _ = run_cli(["run", "--model-file", str(tmp_path / "atk" / "model.pt"), "--spec",
                             str(tmp_path / "atk" / "spec.json"), "--attack", "badnets", "--defense", "ft",
                             "--set", "defense.epochs=1", "--out", str(tmp_path / "own"), "--eval-size", "200"],
                            capsys)
    assert code == 0 and "ASR" in out3
    assert json.loads((tmp_path / "own" / "metrics.json").read_text())["before"]["asr"] == pytest.approx(
        m["before"]["asr"], abs=1e-6)


# ============================================================================ a sweep's bad input

def _closed_port() -> int:
    import socket

    with socket.socket() as s:          # bound then released: nothing listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("extra, message", [
    (["--set", "dataset=imagefolder:/nonexistent/path"], "dataset: image folder not found: /nonexistent/path"),
    (["--set", "attacks.blend.dataset=imagefolder:/nonexistent/blend"],
     "attacks.blend.dataset: image folder not found: /nonexistent/blend"),
    (["--set", "dataset=imagefolder:missing/rel"], "image folder not found: {tmp}/missing/rel"),
    (["--tracking-uri", "http://127.0.0.1:{port}"], "--tracking-uri http://127.0.0.1:{port}: the MLflow tracking "
                                                    "server does not answer ([Errno 111] Connection refused"),
    (["--storage", "s3://sweep/p", "--storage-endpoint", "http://127.0.0.1:{port}"],
     "storage.uri: storage s3://sweep/p: cannot reach the S3 endpoint http://127.0.0.1:{port}"),
    (["--optuna-storage", "postgresql://u:secret@127.0.0.1:{port}/x"],
     "--optuna-storage postgresql://u:***@127.0.0.1:{port}/x: cannot open it"),
])
def test_a_sweep_with_bad_input_stops_before_any_work(extra, message, tmp_path, capsys, monkeypatch):
    """A missing image folder, a dead tracking server, storage or Optuna database: one line
    (never a password), exit 2, no sweep directory, no Ray (each would otherwise fail every attack
    stage, or wait out retries)."""
    import os
    import time

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    port = _closed_port()
    extra = [a.format(port=port) for a in extra]
    start = time.perf_counter()
    code, _, err = run_cli(["quickstart", "--workdir", str(tmp_path / "w"), *extra], capsys)
    assert code == 2
    assert message.format(port=port, tmp=tmp_path) in err and "Traceback" not in err and "secret" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "w").exists()
    assert time.perf_counter() - start < 30
    ray = sys.modules.get("ray")
    assert ray is None or not ray.is_initialized()
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ      # bounded for the probe only

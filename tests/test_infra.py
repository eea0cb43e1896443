"""``infra/`` against the code: every file parses; the image installs what ``pyproject.toml`` pins
(Ray's version in the base image's tag, torch and torchvision, MLflow in the tracking server's
image); every ``python -m sweep`` command uses a preset and options that exist (and its
``--set`` overrides load); every ``ray start`` option exists in the installed Ray's CLI; every
``SWEEP_*`` variable is one the code reads; secrets come from the environment or a Kubernetes
Secret and published ports stay on 127.0.0.1. The cluster tier runs the tracking server's real
entrypoint (``mlflow server --app-name basic-auth`` from the environment) on loopback: it refuses
a request without credentials and takes one with them.

What no test here can do: pull the images or bring the compose stack and the clusters up (no
container engine and no registry access on CI's machines); infra/README.md says what ran where.
"""
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
FILES = sorted(p for p in INFRA.rglob("*") if p.is_file())


def _text(p: Path) -> str:
    return p.read_text()


def _pins() -> dict[str, Requirement]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {r.name: r for r in map(Requirement, deps)}


def _yaml_docs(p: Path) -> list:
    return [d for d in yaml.safe_load_all(_text(p)) if d is not None]


def _strings(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)


def _commands(prefix: str) -> list[tuple[Path, list[str]]]:
    """Every command starting with ``prefix`` in infra/ (YAML strings, scripts, the README),
    backslash continuations joined, as argv lists."""
    found = []
    for p in FILES:
        texts = list(_strings(_yaml_docs(p))) if p.suffix == ".yaml" else [_text(p)]
        for text in texts:
            text = re.sub(r"\\\n\s*", " ", text)
            for line in text.splitlines():
                i = line.find(prefix)
                if i < 0:
                    continue
                argv = shlex.split(line[i:].split("`")[0].split(" #")[0])
                ends = [k for k, a in enumerate(argv) if a in ("|", "||", "&&", ";") or a.startswith(">")]
                found.append((p, argv[:ends[0]] if ends else argv))
    return found


def test_infra_holds_the_deployment_files():
    names = {str(p.relative_to(INFRA)) for p in FILES}
    assert {"Dockerfile", "README.md", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "ray-up/aws-gpu.yaml",
            "tracking/compose.yaml", "tracking/mlflow-entrypoint.sh", "tracking/s3-entrypoint.sh"} <= names, names


@pytest.mark.parametrize("path", [p for p in FILES if p.suffix == ".yaml"], ids=lambda p: str(p.relative_to(INFRA)))
def test_every_yaml_file_parses(path):
    assert _yaml_docs(path)


@pytest.mark.parametrize("path", [p for p in FILES if p.suffix == ".sh"], ids=lambda p: str(p.relative_to(INFRA)))
def test_every_script_is_valid_sh(path):
    r = subprocess.run(["sh", "-n", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_the_image_installs_what_pyproject_pins():
    pins = _pins()
    docker = _text(INFRA / "Dockerfile")
    (base,) = re.findall(r"^FROM\s+(\S+)", docker, re.M)
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-gpu", base)
    assert m, f"the base image {base} is not a versioned rayproject/ray GPU image"
    assert pins["ray"].specifier.contains(m.group(1)), (base, str(pins["ray"]))
    tomllib_python = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert Requirement(f"python{tomllib_python}").specifier.contains(f"{m.group(2)}.{m.group(3)}")
    installed = dict(re.findall(r"\b(torch|torchvision)==(\S+)", docker))
    for name in ("torch", "torchvision"):
        assert installed.get(name) and f"=={installed[name]}" == str(pins[name].specifier), (name, installed)
    mlflow = _text(INFRA / "tracking" / "mlflow.Dockerfile")
    (version,) = re.findall(r"mlflow(?:\[auth\])?==([\d.]+)", mlflow)
    assert pins["mlflow"].specifier.contains(version), (version, str(pins["mlflow"]))
    # the RayCluster says the image's Ray version
    cluster = _yaml_docs(INFRA / "kuberay" / "raycluster.yaml")[0]
    assert cluster["spec"]["rayVersion"] == m.group(1)


def test_every_sweep_command_uses_real_presets_and_options():
    from sweep.cli import build_parser, preset_parser
    from sweep.preset import list_presets, load_preset

    commands = _commands("python -m sweep")
    assert any(p.name == "rayjob.yaml" for p, _ in commands) and any(p.name == "README.md" for p, _ in commands)
    presets = set(list_presets())
    options = {o for a in preset_parser()._actions for o in a.option_strings}
    for path, argv in commands:
        args = argv[3:]
        where = f"{path.relative_to(ROOT)}: {' '.join(argv)}"
        assert args, where
        if args[0] in ("list", "report", "bench", "train", "run"):
            try:
                build_parser().parse_args(args)
            except SystemExit:
                pytest.fail(f"{where}: not a valid command")
            continue
        assert args[0] in presets, f"{where}: no preset {args[0]!r}"
        used = [a.split("=")[0] for a in args[1:] if a.startswith("--")]
        assert set(used) <= options, f"{where}: unknown option(s) {set(used) - options}"
        sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
        load_preset(args[0], sets)


def test_every_ray_start_option_exists_in_the_installed_ray():
    commands = [(p, argv) for p, argv in _commands("ray start")]
    assert commands
    helptext = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "start", "--help"], capture_output=True,
                              text=True).stdout
    known = set(re.findall(r"(--[a-z][a-z0-9-]*)", helptext))
    assert "--head" in known and "--address" in known, helptext[:500]
    for path, argv in commands:
        used = {a.split("=")[0] for a in argv[2:] if a.startswith("--")}
        assert used <= known, f"{path.relative_to(ROOT)}: {used - known} not options of `ray start`"
    rayparams = {k.replace("_", "-") for k in _yaml_docs(INFRA / "kuberay" / "raycluster.yaml")[0]["spec"]
                 ["headGroupSpec"]["rayStartParams"]}
    assert {f"--{k}" for k in rayparams} <= known, rayparams


def test_every_sweep_variable_in_infra_is_one_the_code_reads():
    code = "\n".join(p.read_text() for d in ("sweep", "trainables") for p in (ROOT / d).rglob("*.py"))
    read = set(re.findall(r"\"(SWEEP_[A-Z_]+)\"", code))
    used = {v for p in FILES for v in re.findall(r"\b(SWEEP_[A-Z_]+)\b", _text(p))}
    assert used and used <= read, f"variables no code reads: {used - read}"


def test_secrets_come_from_the_environment_and_ports_stay_on_loopback():
    compose = _yaml_docs(INFRA / "tracking" / "compose.yaml")[0]
    secret = re.compile(r"PASSWORD|SECRET|_KEY$")
    for name, service in compose["services"].items():
        for var, value in (service.get("environment") or {}).items():
            if secret.search(var):
                assert re.fullmatch(r"\$\{[A-Z0-9_]+(:\?[^}]*)?\}", str(value)), f"{name}.{var} holds a literal secret"
            for m in re.finditer(r"//[^:/@]+:([^@]+)@", str(value)):      # passwords inside URIs
                assert m.group(1).startswith("${"), f"{name}.{var} holds a literal password"
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    example = _text(INFRA / "tracking" / ".env.example")
    for line in example.splitlines():
        if "=" in line and secret.search(line.split("=")[0]):
            assert line.split("=", 1)[1] == "", f".env.example holds a value: {line}"
    assert "--app-name basic-auth" in _text(INFRA / "tracking" / "mlflow-entrypoint.sh")
    # Kubernetes: credentials only through Secrets; Ray's token authentication on
    for p in (INFRA / "kuberay").glob("*.yaml"):
        for doc in _yaml_docs(p):
            for s in _strings(doc):
                assert not re.search(r"(password|secret|token)\s*[:=]\s*\S", s, re.I), f"{p.name}: {s}"
    cluster = _yaml_docs(INFRA / "kuberay" / "raycluster.yaml")[0]
    assert cluster["spec"]["authOptions"]["mode"] == "token"


def test_the_kuberay_job_targets_the_cluster_and_the_cluster_has_gpu_workers():
    cluster = _yaml_docs(INFRA / "kuberay" / "raycluster.yaml")[0]
    job = _yaml_docs(INFRA / "kuberay" / "rayjob.yaml")[0]
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    assert cluster["spec"]["enableInTreeAutoscaling"] is True
    assert cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    (gpu,) = cluster["spec"]["workerGroupSpecs"]
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) >= 1 and gpu["minReplicas"] < gpu["maxReplicas"]
    images = {c["image"] for s in (cluster["spec"]["headGroupSpec"], gpu) for c in s["template"]["spec"]["containers"]}
    images |= {c["image"] for c in job["spec"]["submitterPodTemplate"]["spec"]["containers"]}
    images.add(_yaml_docs(INFRA / "ray-up" / "aws-gpu.yaml")[0]["docker"]["image"])
    assert len(images) == 1, images
    assert "python -m sweep nba_cifar" in job["spec"]["entrypoint"]


# ============================================================================ run for real

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.cluster
def test_the_tracking_servers_entrypoint_runs_mlflow_with_basic_auth(tmp_path):
    """infra/tracking/mlflow-entrypoint.sh as compose runs it, with SQLite and a folder in place
    of PostgreSQL and S3: the server refuses a request without credentials (401) and with a wrong
    password, and the sweep's own MLflow client works with the admin's."""
    import urllib.error
    import urllib.request

    port = _free_port()
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bindir + os.pathsep + os.environ["PATH"],
           "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path}/mlflow.db",
           "MLFLOW_AUTH_DATABASE_URI": f"sqlite:///{tmp_path}/auth.db",
           "MLFLOW_ARTIFACTS_DESTINATION": str(tmp_path / "artifacts"),
           "MLFLOW_ADMIN_USERNAME": "admin", "MLFLOW_ADMIN_PASSWORD": "s3cret-Passw0rd",
           "MLFLOW_FLASK_SERVER_SECRET_KEY": "k" * 32, "MLFLOW_HOST": "127.0.0.1", "MLFLOW_PORT": str(port)}
    for k in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(k, None)
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(["sh", str(INFRA / "tracking" / "mlflow-entrypoint.sh")], env=env, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def status(user=None, password=None) -> int:
            req = urllib.request.Request(f"{url}/api/2.0/mlflow/experiments/search?max_results=1")
            if user:
                import base64
                req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
            try:
                return urllib.request.urlopen(req, timeout=30).status
            except urllib.error.HTTPError as e:
                return e.code

        deadline = time.time() + 120
        while True:
            try:
                code = status()
                break
            except OSError:             # not listening yet, or still starting its workers
                assert server.poll() is None and time.time() < deadline, (tmp_path / "server.log").read_text()[-3000:]
                time.sleep(1)
        assert code == 401
        assert status("admin", "wrong") == 401
        assert status("admin", "s3cret-Passw0rd") == 200
        check = subprocess.run(
            [sys.executable, "-c", "from sweep.tracking import Tracker\n"
             f"t = Tracker('{url}', 'infra-check', '{tmp_path}')\n"
             "r = t.create_run('r', {'role': 'sweep'})\nt.end(r)\nprint('ok', r)"],
            env={**env, "MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": "s3cret-Passw0rd",
                 "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"},
            capture_output=True, text=True, cwd=str(ROOT), timeout=120)
        assert check.returncode == 0 and "ok" in check.stdout, check.stderr[-2000:]
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
        log.close()

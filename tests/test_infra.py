"""``infra/`` against the code and against what the systems it deploys accept.

Against the code: every file parses; the image installs what ``pyproject.toml`` pins (Ray's
version in the base image's tag, torch and torchvision, MLflow in the tracking server's image);
every ``python -m sweep`` command uses a preset and options that exist (and its ``--set``
overrides load); every ``ray start`` option exists in the installed Ray's CLI; every ``SWEEP_*``
variable is one the code reads; the dataset Job fills the volume the Ray pods read.

Against what a deployment accepts, one check each (``CHECKS``), every one with a negative control
(``BROKEN``: a copy of infra/ with one file broken must fail it): the KubeRay objects against the
schema ``infra/schemas/kuberay_schema.py`` writes, the Kubernetes objects against
kubernetes-validate's strict schemas, KubeRay's admission rules for a RayJob's lifetime, MLflow's
host check against every tracking URI, the database roles and names every PostgreSQL URL uses,
``ray up``'s env-file path against where Ray copies file_mounts, secrets as references only, the
runbook's commands against the files they use, the compose ports, the ``ray up`` nodes' AMI and
credentials, the trials a GPU node holds, the resuming RayJob.

The cluster tier runs the tracking stack's PostgreSQL init script on a real PostgreSQL 15 and the
MLflow server's real entrypoint (``mlflow server --app-name basic-auth`` from the environment) on
it, on loopback.

What no test here can do: build or pull the images, bring the compose stack, a Kubernetes cluster
with KubeRay or a ``ray up`` cluster up (no container engine, registry access or cloud account on
CI's machines); infra/README.md lists what stands in for each.
"""
import os
import re
import shlex
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
                rest = line[i:]
                if i and line[i - 1] in "\"'":       # a command quoted for ray exec / ssh: up to its quote
                    rest = rest.split(line[i - 1])[0]
                argv = shlex.split(rest.split("`")[0].split(" #")[0])
                ends = [k for k, a in enumerate(argv) if a in ("|", "||", "&&", ";") or a.startswith(">")]
                found.append((p, argv[:ends[0]] if ends else argv))
    return found


def test_infra_holds_the_deployment_files():
    names = {str(p.relative_to(INFRA)) for p in FILES}
    assert {"Dockerfile", "README.md", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "kuberay/rayjob-resume.yaml",
            "kubernetes/postgres.yaml", "kubernetes/s3.yaml", "kubernetes/mlflow.yaml", "kubernetes/datasets.yaml",
            "ray-up/aws-gpu.yaml", "ray-up/backdoor-sweep.env.example", "schemas/kuberay-v1.schema.json",
            "tracking/compose.yaml", "tracking/mlflow-entrypoint.sh", "tracking/postgres-init.sh",
            "tracking/s3-entrypoint.sh"} <= names, names


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
    from sweep.config import list_presets, load_preset

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


def test_mlflow_runs_with_basic_auth_and_ray_with_token_auth():
    assert '"--app-name", "basic-auth"' in _text(INFRA / "tracking" / "mlflow-entrypoint.sh")
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

@pytest.mark.cluster
@pytest.mark.skipif(os.geteuid() != 0, reason="PostgreSQL runs as the postgres user: needs root")
def test_the_tracking_stacks_init_and_mlflow_entrypoint_run_on_postgresql(tmp_path):
    """infra/tracking/postgres-init.sh on a real PostgreSQL 15, then infra/tracking/mlflow-entrypoint.sh
    on it as the manifests run it (a folder in place of S3), with passwords that hold / @ : % '.
    The roles and databases exist and take their passwords; the server refuses a request without
    or with wrong credentials (401), answers the Host header of the RayJob's URL and refuses a
    foreign one (403) with the Kubernetes Deployment's MLFLOW_ALLOWED_HOSTS; the admin creates
    the user `sweep` as the runbook does, and the sweep's own MLflow client works as `sweep`."""
    import base64
    import urllib.error
    import urllib.parse
    import urllib.request

    import psycopg2

    sys.path.insert(0, str(ROOT / "tests"))
    import cluster_harness as ch

    if not (ch.PG_BIN / "postgres").exists():
        pytest.skip(f"no PostgreSQL server in {ch.PG_BIN}")
    db_pw, optuna_pw, admin_pw = "m/l@f:l%o'w-1", "o/p@t:u%n'a-2", "a/d@m:i%n'-3"
    root = ch.make_root("bsi-")
    pg = ch.start_postgres(root, roles=())
    server = None
    try:
        admin = urllib.parse.urlsplit(pg.admin_dsn)
        init = subprocess.run(["sh", str(INFRA / "tracking" / "postgres-init.sh")], capture_output=True, text=True,
                              timeout=60, env={**os.environ, "PATH": f"{ch.PG_BIN}{os.pathsep}{os.environ['PATH']}",
                                               "PGHOST": admin.hostname, "PGPORT": str(admin.port),
                                               "PGPASSWORD": admin.password, "POSTGRES_USER": "postgres",
                                               "MLFLOW_DB_PASSWORD": db_pw, "OPTUNA_DB_PASSWORD": optuna_pw})
        assert init.returncode == 0, init.stderr
        for user, password, db in (("mlflow", db_pw, "mlflow"), ("mlflow", db_pw, "mlflow_auth"),
                                   ("optuna", optuna_pw, "optuna")):
            psycopg2.connect(host=admin.hostname, port=admin.port, user=user, password=password, dbname=db).close()
        with pytest.raises(psycopg2.OperationalError):
            psycopg2.connect(host=admin.hostname, port=admin.port, user="optuna", password=db_pw, dbname="optuna")

        port = ch.free_port()
        deployment = next(d for d in _yaml_docs(INFRA / "kubernetes" / "mlflow.yaml") if d["kind"] == "Deployment")
        manifest_env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
        pg_at = f"mlflow@127.0.0.1:{pg.port}"
        env = {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"],
               "MLFLOW_BACKEND_STORE_URI": manifest_env["MLFLOW_BACKEND_STORE_URI"].replace("mlflow@postgres:5432", pg_at),
               "MLFLOW_AUTH_DATABASE_URI": manifest_env["MLFLOW_AUTH_DATABASE_URI"].replace("mlflow@postgres:5432", pg_at),
               "MLFLOW_DB_PASSWORD": db_pw, "MLFLOW_ARTIFACTS_DESTINATION": str(tmp_path / "artifacts"),
               "MLFLOW_AUTH_ADMIN_USERNAME": "admin", "MLFLOW_AUTH_ADMIN_PASSWORD": admin_pw,
               "MLFLOW_FLASK_SERVER_SECRET_KEY": "k" * 32, "MLFLOW_HOST": "127.0.0.1", "MLFLOW_PORT": str(port),
               "MLFLOW_ALLOWED_HOSTS": f"{manifest_env['MLFLOW_ALLOWED_HOSTS']},127.0.0.1:{port}"}
        for k in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            env.pop(k, None)
        log = open(tmp_path / "server.log", "w")
        server = subprocess.Popen(["sh", str(INFRA / "tracking" / "mlflow-entrypoint.sh")], env=env, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}"

        def status(user=None, password=None, host=None) -> int:
            req = urllib.request.Request(f"{url}/api/2.0/mlflow/experiments/search?max_results=1")
            if user:
                req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
            if host:
                req.add_header("Host", host)
            try:
                return urllib.request.urlopen(req, timeout=30).status
            except urllib.error.HTTPError as e:
                return e.code

        deadline = time.time() + 180
        while True:
            try:
                code = status()
                break
            except OSError:             # not listening yet, or still running the migrations
                assert server.poll() is None and time.time() < deadline, (tmp_path / "server.log").read_text()[-3000:]
                time.sleep(1)
        assert code == 401
        assert status("admin", "wrong") == 401
        assert status("admin", admin_pw) == 200
        rayjob = _yaml_docs(INFRA / "kuberay" / "rayjob.yaml")[0]["spec"]["entrypoint"]
        in_cluster = _host_header(re.search(r"--tracking-uri (\S+)", rayjob).group(1))
        assert status("admin", admin_pw, host=in_cluster) == 200, in_cluster
        assert status("admin", admin_pw, host="tracking.example.org:5000") == 403
        user = subprocess.run(
            [sys.executable, "-c", "import os\nfrom mlflow.server.auth.client import AuthServiceClient\n"
             f"print(AuthServiceClient('{url}').create_user('sweep', os.environ['MLFLOW_SWEEP_PASSWORD']).username)"],
            env={**env, "MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": admin_pw,
                 "MLFLOW_SWEEP_PASSWORD": "s/w@e:e%p'-4"}, capture_output=True, text=True, timeout=120)
        assert user.returncode == 0 and user.stdout.strip() == "sweep", user.stderr[-2000:]
        check = subprocess.run(
            [sys.executable, "-c", "from sweep.tracking import Tracker\n"
             f"t = Tracker('{url}', 'infra-check', '{tmp_path}')\n"
             "r = t.create_run('r', {'role': 'sweep'})\nt.end(r)\nprint('ok', r)"],
            env={**env, "MLFLOW_TRACKING_USERNAME": "sweep", "MLFLOW_TRACKING_PASSWORD": "s/w@e:e%p'-4",
                 "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"},
            capture_output=True, text=True, cwd=str(ROOT), timeout=120)
        assert check.returncode == 0 and "ok" in check.stdout, check.stderr[-2000:]
    finally:
        if server is not None:
            os.killpg(server.pid, 15)
            server.wait(timeout=30)
        leftovers = ch.stop_all([pg], root)
        assert not leftovers, leftovers


# ============================================================================ what a real deployment rejects
#
# Each check reads an infra/ tree (the repository's, or a broken copy of it) and returns its
# problems; a test asserts the repository's has none, and the negative controls below assert that
# a copy with one file broken has some.

K8S_DIRS = ("kuberay", "kubernetes")
PLACEHOLDERS = ("REGISTRY/", "DLAMI_ID", "AWS_ACCOUNT_ID")   # what the runbook's render() fills in
NAMESPACE = "backdoor-sweep"
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|_KEY$|ACCESS_KEY")
URL_PASSWORD = re.compile(r"://[^/\s:@'\"]+:([^@\s'\"]+)@")


def _load_generator():
    import importlib.util

    spec = importlib.util.spec_from_file_location("kuberay_schema", INFRA / "schemas" / "kuberay_schema.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _k8s_docs(root: Path) -> list[tuple[Path, dict]]:
    return [(p, d) for sub in K8S_DIRS for p in sorted((root / sub).glob("*.yaml")) for d in _yaml_docs(p)]


def _texts(root: Path) -> list[tuple[Path, str]]:
    return [(p, p.read_text()) for p in sorted(root.rglob("*")) if p.is_file() and p.suffix != ".json"]


def _pod_specs(doc: dict) -> list[dict]:
    """The pod specs of a Kubernetes object (workloads, RayCluster groups, RayJob's submitter)."""
    spec = doc.get("spec") or {}
    kind = doc.get("kind")
    if kind in ("Deployment", "StatefulSet", "Job"):
        return [spec["template"]["spec"]]
    if kind == "RayCluster":
        return [g["template"]["spec"] for g in [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]]
    if kind == "RayJob":
        return [spec["submitterPodTemplate"]["spec"]] if "submitterPodTemplate" in spec else []
    return []


def _containers(doc: dict) -> list[dict]:
    return [c for s in _pod_specs(doc) for c in [*s.get("initContainers", []), *s.get("containers", [])]]


def check_kuberay_schema(root: Path) -> list[str]:
    """RayCluster / RayJob against the generated KubeRay schema, whose Kubernetes types resolve to
    kubernetes-validate's strict schemas."""
    import importlib.resources
    import json

    from jsonschema import Draft202012Validator
    from referencing import Registry, Resource

    gen = _load_generator()
    schema = json.loads((root / "schemas" / "kuberay-v1.schema.json").read_text())
    defs = importlib.resources.files("kubernetes_validate").joinpath(
        "kubernetes-json-schema", f"v{gen.K8S_VERSION}-local-strict", "_definitions.json")
    registry = Registry().with_resource(gen.K8S_DEFINITIONS, Resource.from_contents(json.loads(defs.read_text())))
    problems, kinds = [], set()
    for path, doc in _k8s_docs(root):
        if not str(doc.get("apiVersion", "")).startswith("ray.io/"):
            continue
        kinds.add(doc.get("kind"))
        if doc.get("kind") not in schema["$defs"]:
            problems.append(f"{path.name}: no KubeRay kind {doc.get('kind')!r}")
            continue
        validator = Draft202012Validator({"$defs": schema["$defs"], "$ref": f"#/$defs/{doc['kind']}"}, registry=registry)
        for e in validator.iter_errors(doc):
            problems.append(f"{path.name}: {'/'.join(map(str, e.absolute_path))}: {e.message[:200]}")
    if not {"RayCluster", "RayJob"} <= kinds:
        problems.append(f"expected a RayCluster and a RayJob, found {sorted(kinds)}")
    return problems


def check_core_objects(root: Path) -> list[str]:
    """Every Kubernetes object other than KubeRay's against kubernetes-validate's strict schema."""
    import kubernetes_validate

    version = _load_generator().K8S_VERSION
    problems, seen = [], 0
    for path, doc in _k8s_docs(root):
        if str(doc.get("apiVersion", "")).startswith("ray.io/"):
            continue
        seen += 1
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            problems.append(f"{path.name}: {doc.get('kind')} {doc['metadata'].get('name')}: {e.message[:200]}")
        except kubernetes_validate.SchemaNotFoundError as e:
            problems.append(f"{path.name}: {e}")
    return problems if seen else ["no Kubernetes objects found"]


def check_deletion_policy(root: Path) -> list[str]:
    """KubeRay's admission rules for a RayJob's lifetime fields. ValidateRayJobSpec and
    validateDeletionConfiguration in ray-operator/controllers/ray/utils/validation.go (ray-project/
    kuberay at 0074504f84f22d26df800ebcd2e0a3e1490e2aef, lines 233-248 and 423-426): a job that
    keeps its cluster (shutdownAfterJobFinishes false) may not set ttlSecondsAfterFinished > 0,
    the TTL may not be negative, a suspended job must shut its cluster down; the controller marks
    a job that breaks one ValidationFailed and never submits it."""
    problems, jobs = [], 0
    for path, doc in _k8s_docs(root):
        if doc.get("kind") != "RayJob":
            continue
        jobs += 1
        spec = doc["spec"]
        shutdown, ttl = bool(spec.get("shutdownAfterJobFinishes", False)), int(spec.get("ttlSecondsAfterFinished", 0))
        where = f"{path.name} ({doc['metadata']['name']})"
        if not shutdown and ttl > 0:
            problems.append(f"{where}: shutdownAfterJobFinishes false with ttlSecondsAfterFinished {ttl}")
        if ttl < 0:
            problems.append(f"{where}: negative ttlSecondsAfterFinished")
        if spec.get("suspend") and not shutdown:
            problems.append(f"{where}: suspend without shutdownAfterJobFinishes")
    return problems if jobs else ["no RayJob found"]


def _tracking_uris(root: Path) -> list[tuple[Path, str]]:
    found = []
    for path, text in _texts(root):
        for m in re.finditer(r"(?:--tracking-uri[ =]|MLFLOW_TRACKING_URI=)(\S+)", text):
            uri = m.group(1).strip("`'\",")
            if "<" not in uri and "$" not in uri:
                found.append((path, uri))
    return found


def _mlflow_servers(root: Path) -> dict[str, list[str]]:
    """Each MLflow server's allowed Host headers (MLflow's defaults where none are given)."""
    from mlflow.server.security_utils import get_default_allowed_hosts

    def hosts(value):
        return [h.strip() for h in value.split(",")] if value else get_default_allowed_hosts()

    servers = {}
    compose = _yaml_docs(root / "tracking" / "compose.yaml")[0]
    servers["tracking/compose.yaml"] = hosts(compose["services"]["mlflow"]["environment"].get("MLFLOW_ALLOWED_HOSTS"))
    for path, doc in _k8s_docs(root):
        for c in _containers(doc):
            if "mlflow" in c["image"]:
                env = {e["name"]: e.get("value") for e in c.get("env", [])}
                servers[f"{path.parent.name}/{path.name}"] = hosts(env.get("MLFLOW_ALLOWED_HOSTS"))
    return servers


def _host_header(uri: str) -> str:
    """The Host header an HTTP client sends for ``uri`` (the port only when not the scheme's)."""
    from urllib.parse import urlsplit

    u = urlsplit(uri)
    default = {"http": 80, "https": 443}[u.scheme]
    return u.hostname if u.port in (None, default) else f"{u.hostname}:{u.port}"


def check_allowed_hosts(root: Path) -> list[str]:
    """Every tracking URI in infra/ passes every MLflow server's host check, judged by MLflow's
    own function (mlflow/server/security_utils.py: is_allowed_host_header; the list given with
    --allowed-hosts replaces get_default_allowed_hosts, mlflow/server/security.py get_allowed_hosts)."""
    from mlflow.server.security_utils import is_allowed_host_header

    uris = _tracking_uris(root)
    servers = _mlflow_servers(root)
    problems = [] if len(servers) >= 2 else [f"expected the compose and the Kubernetes MLflow server: {sorted(servers)}"]
    if not any(p.name == "rayjob.yaml" for p, _ in uris):
        problems.append("the RayJob names no tracking URI")
    for server, allowed in servers.items():
        if "*" in allowed:
            problems.append(f"{server}: accepts any Host header")
        for path, uri in uris:
            if not is_allowed_host_header(allowed, _host_header(uri)):
                problems.append(f"{server} answers 403 to {uri} ({path.name})")
    return problems


def _postgres_init(root: Path) -> tuple[set, set]:
    text = "\n".join(p.read_text() for p in (root / "tracking").glob("postgres-init.*"))
    return set(re.findall(r"CREATE ROLE (\w+)", text)), set(re.findall(r"CREATE DATABASE (\w+)", text))


def check_database_urls(root: Path) -> list[str]:
    """Every PostgreSQL URL in infra/ names a role and a database that the init script creates."""
    roles, databases = _postgres_init(root)
    problems, urls = [], 0
    for path, text in _texts(root):
        for m in re.finditer(r"postgres(?:ql)?(?:\+\w+)?://([^\s\"'@/:]+)(?::[^@\s]*)?@[^/\s\"']+/([\w$<>-]+)", text):
            urls += 1
            user, db = m.groups()
            if user not in roles:
                problems.append(f"{path.name}: {m.group(0)}: no role {user!r} in postgres-init.sh (it creates {sorted(roles)})")
            if db not in databases:
                problems.append(f"{path.name}: {m.group(0)}: no database {db!r} in postgres-init.sh ({sorted(databases)})")
    return problems if urls >= 3 else problems + [f"only {urls} PostgreSQL URLs found"]


def check_env_file(root: Path) -> list[str]:
    """`ray up` copies each file_mounts entry to get_docker_host_mount_location(<cluster>)/<target>
    on the host (ray/autoscaler/_private/command_runner.py, DockerCommandRunner.run_rsync_up) before
    it runs `docker run` there, so a `--env-file` must name that host path."""
    from ray.autoscaler.sdk import get_docker_host_mount_location

    cfg = _yaml_docs(root / "ray-up" / "aws-gpu.yaml")[0]
    mount = get_docker_host_mount_location(cfg["cluster_name"])
    targets = {os.path.join(mount, t.lstrip("/")): t for t in cfg.get("file_mounts", {})}
    problems, found = [], 0
    docker = cfg["docker"]
    for key in ("run_options", "head_run_options", "worker_run_options"):
        for option in docker.get(key, []):
            argv = shlex.split(option)
            for i, a in enumerate(argv):
                if a == "--env-file" or a.startswith("--env-file="):
                    found += 1
                    path = argv[i + 1] if a == "--env-file" else a.split("=", 1)[1]
                    if path not in targets:
                        problems.append(f"--env-file {path}: ray up puts its file_mounts at {sorted(targets)}")
                    elif targets[path].startswith("~"):
                        problems.append(f"file_mounts target {targets[path]}: `~` is not expanded in the host path")
    return problems if found else ["no --env-file in the ray up configuration"]


def _env_example_problems(path: Path) -> list[str]:
    return [f"{path.name} holds a value: {line}" for line in path.read_text().splitlines()
            if "=" in line and not line.startswith("#") and SECRET_NAME.search(line.split("=")[0])
            and line.split("=", 1)[1].strip()]


def check_secret_references(root: Path) -> list[str]:
    """No secret is written into infra/: Kubernetes env vars with secret names take valueFrom a
    Secret, no Secret object ships with data, no URL holds a literal password; compose takes
    secrets from ${VAR:?}; the example env files leave them empty."""
    problems = []
    for path, doc in _k8s_docs(root):
        if doc.get("kind") == "Secret":
            problems.append(f"{path.name}: ships Secret {doc['metadata']['name']} (create it with kubectl instead)")
        for c in _containers(doc):
            for e in c.get("env", []):
                if SECRET_NAME.search(e["name"]) and "value" in e:
                    problems.append(f"{path.name}: {c['name']}.{e['name']} is a literal, not a secretKeyRef")
        for s in _strings(doc):
            for m in URL_PASSWORD.finditer(s):
                if not m.group(1).startswith("$("):
                    problems.append(f"{path.name}: a password in {s[:80]!r}")
    compose = _yaml_docs(root / "tracking" / "compose.yaml")[0]
    for name, service in compose["services"].items():
        for var, value in (service.get("environment") or {}).items():
            if SECRET_NAME.search(var) and not re.fullmatch(r"\$\{[A-Z0-9_]+(:\?[^}]*)?\}", str(value)):
                problems.append(f"compose: {name}.{var} holds a literal secret")
            for m in URL_PASSWORD.finditer(str(value)):
                if not m.group(1).startswith("${"):
                    problems.append(f"compose: {name}.{var} holds a literal password")
    for example in root.rglob("*.env.example"):
        problems += _env_example_problems(example)
    for example in root.rglob(".env.example"):
        problems += _env_example_problems(example)
    return problems


def _runbook_commands(root: Path) -> list[str]:
    """The README's shell commands, backslash continuations joined."""
    text = (root / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    return [line.split(" #")[0].strip() for b in blocks for line in re.sub(r"\\\n\s*", " ", b).splitlines()
            if line.strip() and not line.strip().startswith("#")]


def check_runbook(root: Path) -> list[str]:
    """The runbook ships what it uses and uses what it ships: every manifest it applies exists,
    every manifest of kuberay/ and kubernetes/ is applied by it (through `render`, which fills in
    the registry, wherever the file names one), every Secret a manifest references is created by a
    `kubectl create secret` with each key referenced, every image of the project's registry is
    built and pushed, every in-cluster host a URL names is a Service of kubernetes/."""
    commands = _runbook_commands(root)
    problems = []
    render = next((c for c in commands if c.startswith("render()")), "")
    for placeholder in PLACEHOLDERS:
        if placeholder not in render:
            problems.append(f"the runbook's render() does not fill in {placeholder}")
    applied = set()
    for c in commands:
        for m in re.finditer(r"(?:render|apply -f|create -f)\s+(infra/\S+\.yaml)", c):
            rel = m.group(1)
            applied.add(rel)
            path = root / rel.removeprefix("infra/")
            if not path.exists():
                problems.append(f"the runbook applies {rel}, which infra/ does not ship")
            elif any(p in path.read_text() for p in PLACEHOLDERS) and f"render {rel}" not in c:
                problems.append(f"{rel} holds a placeholder but is used without render: {c}")
    for sub in K8S_DIRS:
        for p in sorted((root / sub).glob("*.yaml")):
            if f"infra/{sub}/{p.name}" not in applied:
                problems.append(f"infra/{sub}/{p.name} is applied by no step of the runbook")
    created: dict[str, set] = {}
    for c in commands:
        m = re.search(r"create secret (?:generic|docker-registry) (\S+)", c)
        if m:
            created[m.group(1)] = set(re.findall(r"--from-literal=([A-Za-z0-9_]+)=", c))
        m = re.search(r"create configmap (\S+)", c)
        if m:
            created[f"configmap/{m.group(1)}"] = {Path(f).name for f in re.findall(r"--from-file=(\S+)", c)}
            problems += [f"the runbook's configmap takes {f}, which infra/ does not ship"
                         for f in re.findall(r"--from-file=(\S+)", c) if not (root / f.removeprefix("infra/")).exists()]
    services: dict[str, set] = {}
    for path, doc in _k8s_docs(root):
        if doc.get("kind") == "Service":
            services[doc["metadata"]["name"]] = {p["port"] for p in doc["spec"]["ports"]}
        for s in _pod_specs(doc):
            for ref in s.get("imagePullSecrets", []):
                if ref["name"] not in created:
                    problems.append(f"{path.name}: pull secret {ref['name']} is created by no runbook step")
            for v in s.get("volumes", []):
                if "configMap" in v:
                    keys = {i["key"] for i in v["configMap"].get("items", [])}
                    if not keys <= created.get(f"configmap/{v['configMap']['name']}", set()) or \
                            f"configmap/{v['configMap']['name']}" not in created:
                        problems.append(f"{path.name}: configmap {v['configMap']['name']} {sorted(keys)} is created "
                                        "by no runbook step")
            for c in [*s.get("initContainers", []), *s.get("containers", [])]:
                for e in c.get("env", []):
                    ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                    if ref and ref["key"] not in created.get(ref["name"], set()):
                        problems.append(f"{path.name}: secret {ref['name']}/{ref['key']} is created by no runbook step")
                for src in c.get("envFrom", []):
                    if "secretRef" in src and src["secretRef"]["name"] not in created:
                        problems.append(f"{path.name}: secret {src['secretRef']['name']} is created by no runbook step")
                image = c["image"].replace("REGISTRY/", "$REGISTRY/")
                if image.startswith("$REGISTRY/") and not (
                        any(c2.startswith("docker build") and f"-t {image} " in c2 for c2 in commands)
                        and any(c2 == f"docker push {image}" for c2 in commands)):
                    problems.append(f"{path.name}: image {image} is built and pushed by no runbook step")
    for path, text in _texts(root):
        for host, port in re.findall(rf"\b([a-z0-9-]+)\.{NAMESPACE}\.svc(?:\.cluster\.local)?:(\d+)", text):
            if host not in services or int(port) not in services[host]:
                problems.append(f"{path.name}: {host}.{NAMESPACE}.svc:{port} is no Service of infra/kubernetes")
    return problems


def check_compose_reachable(root: Path) -> list[str]:
    """The compose stack publishes its ports on the address the operator names (the tracking host's
    private address, TRACKING_BIND_IP), not on 127.0.0.1 only where no Ray node can reach them."""
    compose = _yaml_docs(root / "tracking" / "compose.yaml")[0]
    problems = []
    for name in ("mlflow", "postgres", "s3"):
        ports = compose["services"][name].get("ports", [])
        if not ports:
            problems.append(f"compose: {name} publishes no port")
        for port in ports:
            if not str(port).startswith("${TRACKING_BIND_IP:?"):
                problems.append(f"compose: {name} publishes {port}, not on ${{TRACKING_BIND_IP}}")
    return problems


def check_ray_up_nodes(root: Path) -> list[str]:
    """On `ray up` the autoscaler on the head calls EC2 with whatever AWS credentials and endpoint
    the head's environment holds: the nodes get S3 through instance profiles, and no AWS key or
    endpoint goes into the env-file or the configuration."""
    cfg = _yaml_docs(root / "ray-up" / "aws-gpu.yaml")[0]
    problems = [f"ray-up worker type {name} has no IamInstanceProfile" for name, t in cfg["available_node_types"].items()
                if name != cfg["head_node_type"] and "IamInstanceProfile" not in t["node_config"]]
    # a plain Ubuntu image has no Docker (ray up stops) and no NVIDIA driver: every node runs the
    # Deep Learning Base AMI, whose id the runbook looks up
    problems += [f"ray-up node type {name} runs {t['node_config'].get('ImageId')}, not DLAMI_ID"
                 for name, t in cfg["available_node_types"].items() if t["node_config"].get("ImageId") != "DLAMI_ID"]
    if not any(c.startswith("export DLAMI_ID=$(aws ssm get-parameter") and "deeplearning/ami" in c
               for c in _runbook_commands(root)):
        problems.append("the runbook does not look up DLAMI_ID (the Deep Learning Base AMI)")
    aws = re.compile(r"\bAWS_(ACCESS_KEY_ID|SECRET_ACCESS_KEY|SESSION_TOKEN|ENDPOINT_URL)\b")
    for p in [root / "ray-up" / "aws-gpu.yaml", *(root / "ray-up").glob("*.env.example")]:
        for line in p.read_text().splitlines():
            if aws.search(line.split("#")[0]):
                problems.append(f"{p.name}: {line.strip()}")
    return problems


def check_gpu_packing(root: Path) -> list[str]:
    """A GPU worker holds as many of nba_cifar's trials as its GPU takes (1 / the trial's GPU
    share): its CPUs must not run out first."""
    resources = yaml.safe_load((ROOT / "sweep" / "presets" / "nba_cifar.yaml").read_text())["resources"]
    nodes = {"ray-up gpu": _yaml_docs(root / "ray-up" / "aws-gpu.yaml")[0]["available_node_types"]["gpu"]["resources"]}
    cluster = _yaml_docs(root / "kuberay" / "raycluster.yaml")[0]
    for group in cluster["spec"]["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        nodes[f"KubeRay {group['groupName']}"] = {"CPU": float(limits["cpu"]), "GPU": float(limits.get("nvidia.com/gpu", 0))}
    problems = [f"{name}: resources {have} do not say its CPUs and GPUs" for name, have in nodes.items()
                if not {"CPU", "GPU"} <= set(have)]
    for name, have in nodes.items():
        by_gpu = have.get("GPU", 0) / resources["gpus"]
        by_cpu = have.get("CPU", 0) // resources["cpus"]
        if by_gpu and by_cpu < by_gpu:
            problems.append(f"{name}: {have} holds {by_cpu:g} trials of {resources['cpus']} CPUs, its GPUs {by_gpu:g}")
    return problems


def check_resume_job(root: Path) -> list[str]:
    """rayjob-resume.yaml is rayjob.yaml with another name and --resume: the same sweep."""
    job, resume = (_yaml_docs(root / "kuberay" / f)[0] for f in ("rayjob.yaml", "rayjob-resume.yaml"))
    problems = []
    if resume["metadata"]["name"] == job["metadata"]["name"]:
        problems.append("the resuming RayJob has the first one's name (a finished RayJob is not run again)")
    args, resume_args = job["spec"]["entrypoint"].split(), resume["spec"]["entrypoint"].split()
    if "--resume" not in resume_args or [a for a in resume_args if a != "--resume"] != args:
        problems.append(f"entrypoints differ beyond --resume: {args} / {resume_args}")
    if {k: v for k, v in job["spec"].items() if k != "entrypoint"} != \
            {k: v for k, v in resume["spec"].items() if k != "entrypoint"}:
        problems.append("the two RayJobs differ beyond their name and --resume")
    return problems


CHECKS = {f.__name__: f for f in (check_kuberay_schema, check_core_objects, check_deletion_policy, check_allowed_hosts,
                                  check_database_urls, check_env_file, check_secret_references, check_runbook,
                                  check_compose_reachable, check_ray_up_nodes, check_gpu_packing,
                                  check_resume_job)}


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_infra_passes(name):
    problems = CHECKS[name](INFRA)
    assert not problems, "\n".join(problems)


# (check, file under infra/, what breaks it): the same check on a copy of infra/ with that one
# change must report a problem
BROKEN = [
    ("check_kuberay_schema", "kuberay/rayjob.yaml", "submissionMode: K8sJobMode", "submitMode: K8sJobMode"),
    ("check_kuberay_schema", "kuberay/raycluster.yaml", "enableInTreeAutoscaling: true", "enableInTreeAutoscaling: yes-please"),
    ("check_core_objects", "kubernetes/mlflow.yaml", "containerPort:", "containerPorts:"),
    ("check_core_objects", "kubernetes/postgres.yaml", "serviceName: postgres", "serviceName: [postgres]"),
    ("check_deletion_policy", "kuberay/rayjob.yaml", "shutdownAfterJobFinishes: false",
     "shutdownAfterJobFinishes: false\n  ttlSecondsAfterFinished: 3600"),
    ("check_allowed_hosts", "kubernetes/mlflow.yaml", "mlflow.backdoor-sweep.svc:5000,", ""),
    ("check_allowed_hosts", "tracking/compose.yaml", "MLFLOW_ALLOWED_HOSTS:", "MLFLOW_ALLOWED_HOSTS_UNUSED:"),
    ("check_database_urls", "tracking/postgres-init.sh", "CREATE ROLE optuna", "CREATE ROLE optuna_user"),
    ("check_database_urls", "kuberay/rayjob.yaml", "/optuna", "/studies"),
    ("check_env_file", "ray-up/aws-gpu.yaml", "--env-file /tmp/ray_tmp_mount/backdoor-sweep/", "--env-file /home/ubuntu/"),
    ("check_secret_references", "kubernetes/postgres.yaml", "valueFrom: {secretKeyRef: {name: postgres-credentials, key: POSTGRES_PASSWORD}}",
     "value: hunter2"),
    ("check_secret_references", "ray-up/backdoor-sweep.env.example", "MLFLOW_TRACKING_PASSWORD=", "MLFLOW_TRACKING_PASSWORD=hunter2"),
    ("check_runbook", "README.md", "--from-literal=OPTUNA_DB_PASSWORD=", "--from-literal=OPTUNA_PASSWORD="),
    ("check_runbook", "kuberay/rayjob.yaml", "http://mlflow.backdoor-sweep.svc:5000", "http://tracking.backdoor-sweep.svc:5000"),
    ("check_runbook", "README.md", "docker push $REGISTRY/backdoor-sweep-mlflow:3.17.2", "true"),
    ("check_runbook", "README.md", "--from-file=infra/tracking/postgres-init.sh ", ""),
    ("check_runbook", "README.md", "render infra/kubernetes/datasets.yaml | kubectl", "kubectl"),
    ("check_gpu_packing", "ray-up/aws-gpu.yaml", "resources: {CPU: 8, GPU: 1}", "resources: {CPU: 4, GPU: 1}"),
    ("check_gpu_packing", "kuberay/raycluster.yaml", 'limits: {cpu: "8"', 'limits: {cpu: "4"'),
    ("check_resume_job", "kuberay/rayjob-resume.yaml", "--workdir /tmp/sweep-runs", "--workdir /tmp/other"),
    ("check_compose_reachable", "tracking/compose.yaml", '"${TRACKING_BIND_IP:?set it in .env}:5000:5000"',
     '"127.0.0.1:5000:5000"'),
    ("check_ray_up_nodes", "ray-up/backdoor-sweep.env.example", "PGPASSWORD=", "AWS_ENDPOINT_URL=\nPGPASSWORD="),
    ("check_ray_up_nodes", "ray-up/aws-gpu.yaml", "ImageId: DLAMI_ID", "ImageId: ami-0c7217cdde317cfec"),
]


@pytest.mark.parametrize("name,rel,old,new", BROKEN, ids=[f"{b[0]}:{b[1]}:{i}" for i, b in enumerate(BROKEN)])
def test_a_broken_copy_fails_the_check(tmp_path, name, rel, old, new):
    import shutil

    copy = tmp_path / "infra"
    shutil.copytree(INFRA, copy)
    text = (copy / rel).read_text()
    assert old in text, f"{rel} no longer holds {old!r}: update the negative control"
    (copy / rel).write_text(text.replace(old, new, 1))
    assert CHECKS[name](copy), f"{name} found nothing wrong with {rel} after {old!r} -> {new!r}"


def test_the_kuberay_schema_file_is_what_its_generator_writes():
    gen = _load_generator()
    assert (INFRA / "schemas" / "kuberay-v1.schema.json").read_text() == gen.render(), \
        "run: python infra/schemas/kuberay_schema.py"


def test_the_dataset_job_fills_the_volume_the_ray_pods_read():
    """The Job loads the preset's dataset with the project's loader into the folder where it
    mounts the claim, and every Ray pod mounts that claim at its SWEEP_DATA_ROOT."""
    from trainables.data import load_dataset   # the loader the Job calls

    docs = _yaml_docs(INFRA / "kubernetes" / "datasets.yaml")
    claim = next(d for d in docs if d["kind"] == "PersistentVolumeClaim")["metadata"]["name"]
    job = next(d for d in docs if d["kind"] == "Job")
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    code = container["command"][-1]
    compile(code, "fill-datasets", "exec")
    assert callable(load_dataset)
    dataset, folder = re.search(r"load_dataset\('([\w:]+)', '([^']+)'\)", code).groups()
    assert dataset == yaml.safe_load((ROOT / "sweep" / "presets" / "nba_cifar.yaml").read_text())["dataset"]
    volumes = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]}
    assert {volumes[m["name"]] for m in container["volumeMounts"] if m["mountPath"] == folder} == {claim}
    cluster = _yaml_docs(INFRA / "kuberay" / "raycluster.yaml")[0]
    for spec in _pod_specs(cluster):
        (ray,) = spec["containers"]
        root = {e["name"]: e.get("value") for e in ray["env"]}["SWEEP_DATA_ROOT"]
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"]}
        assert {claims[m["name"]] for m in ray["volumeMounts"] if m["mountPath"] == root} == {claim}

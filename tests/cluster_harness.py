"""Test support: a real multi-node cluster on one machine, whose nodes share no disk, and the real
servers a cluster sweep talks to (no mocks). Everything binds 127.0.0.1 on free ports, or, given
``host=``, an address of a network namespace the test made (``make_network``).

Each ``start_*`` function starts one service in its own process group (its own session) and
returns a small handle with the address and ``stop()``; ``stop()`` sends the service its shutdown
signal, waits (bounded), SIGKILLs the process group, and finally SIGKILLs every process that
still carries the service's marker (``CLUSTER_HARNESS_ID=<unique>`` in its environment, inherited
by Ray's workers) or is still in its session (Ray's agents, which get a fresh environment): no
stray processes.
``handle.processes()`` lists those processes (used to check their listening sockets).

* ``make_root()``: a short folder in the system temp dir (mode 0711, so the ``postgres`` user
  can reach its own subfolder; pytest's ``/tmp/pytest-of-root`` is 0700, and Ray's unix socket
  paths under a long ``tmp_path`` pass the 107-byte limit).
* ``make_network(hosts) -> Network``: one network namespace per host (``10.77.0.<i>`` on its
  ``eth0``, loopback up) on a bridge that lives in a namespace of its own: the machine's own
  network is not touched, and other runs make their own (random tag). ``with net.enter(host):``
  moves the calling thread into that host's namespace (``setns``); what it starts there (servers,
  Ray nodes, drivers) is born in it and stays. ``net.cut(host)`` takes the host's link down;
  ``net.delete()`` removes every namespace. The ``start_*`` functions take ``host=`` (the address
  to listen on, default 127.0.0.1) and are called inside ``net.enter(...)``.
* ``start_postgres(tmp_dir) -> Postgres``: ``.dsn`` (MLflow's role and database ``mlflow``),
  ``.optuna_dsn`` (Optuna's role and database ``optuna``: two roles, two databases),
  ``.admin_dsn``, ``.port``. initdb runs as the ``postgres`` user (when we are root) into
  ``tmp_dir/postgres`` (chowned to it), scram-sha-256 password auth for local and host
  connections (from 127.0.0.1 and ``samenet``), ``listen_addresses=<host>``, the unix socket in ``tmp_dir/postgres/sock``,
  fsync off. Stopped with SIGINT (fast shutdown: SIGTERM would wait for clients to leave).
* ``start_mlflow_server(dsn, artifacts_dir, log_dir) -> MlflowServer``: ``.url``. A real
  ``python -m mlflow server`` (mlflow 3.17, uvicorn, ``--workers 1``) on Postgres with proxied
  artifacts (``--serve-artifacts --artifacts-destination``: clients see ``mlflow-artifacts:/``
  URIs and up/download through the server, never through the disk). Its default host check
  (``--allowed-hosts``: localhost and private IPs) accepts ``127.0.0.1:<port>``; no security
  option is needed.
* ``start_s3(tmp_dir) -> S3``: ``.endpoint``, ``.bucket``, ``.env`` (AWS_ACCESS_KEY_ID,
  AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, AWS_ENDPOINT_URL, AWS_EC2_METADATA_DISABLED),
  ``.client()``. moto 5.2's server as a SUBPROCESS (``python -m moto.server -H 127.0.0.1``), so
  every node's workers reach it like a real S3, independently of the test process; the bucket is
  created through boto3.
* ``start_ray_head(tmp_dir, num_cpus, env) -> RayHead``: ``.address`` (GCS, ``127.0.0.1:P``),
  ``.temp_dir``, ``.env`` (what a driver or another node needs: the auth token). ``ray start
  --head --block --node-ip-address 127.0.0.1 --temp-dir tmp_dir/ray`` in its own session;
  ``stop()`` signals only that ``ray start`` (never ``ray stop``, which would stop every Ray
  on the machine, other tests' included).
* ``start_isolated_worker_node(head_address, hidden_dirs, num_cpus, resources, env, *,
  head=None, node_dir=None) -> WorkerNode``: ``.node_id`` (hex), ``.resources``, ``.kill()`` (SIGKILL of the
  whole node: node loss), ``.stop()``. A second Ray node in its own process, inside its own
  mount namespace (``unshare --mount --propagation private``), with a tmpfs over each hidden
  dir; its Ray temp dir (``node_dir``) is a private tmpfs too, and so is its cwd. The launcher
  is this file run as a script: it mounts, then builds ``ray._private.node.Node(RayParams(
  node_ip_address="127.0.0.1", gcs_address=head, ...), head=False)`` as
  ``ray.cluster_utils.Cluster.add_node`` does, waits until the GCS lists it and prints its id.
* ``ray_driver(head, **init_kwargs)``: context manager joining the test process to the head
  (``ray.init(address=head.address)``), restoring the environment and Ray's auth state after.
* ``listening_sockets(processes)``: (pid, name, ip, port) of every listening TCP / bound UDP
  socket of the given processes.

What we found with ray 2.60 on these machines (checked, except where said):

* ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (the project default) keeps every Ray process on
  127.0.0.1, but ``ray start --address 127.0.0.1:P`` then refuses to add a node ("Multi-node Ray
  clusters are not supported ..."). With ``=1`` Ray would resolve the node address to the
  external interface (not tried here: that traffic is forbidden). So the head is started with
  ``=0`` and ``--node-ip-address 127.0.0.1``, and the second node is added through the Python
  ``Node`` API with ``node_ip_address="127.0.0.1"``, which does not consult the flag; all
  processes (head, node, driver) run with ``=0``.
* ``ray start --head`` enables token authentication by default (and would create
  ``~/.ray/auth_token``); a driver without ``RAY_AUTH_MODE=token`` gets "Failed to connect to
  Ray cluster". The harness generates one token per head and hands ``RAY_AUTH_MODE=token`` and
  ``RAY_AUTH_TOKEN`` to the head, the extra node and the driver: nothing reads or writes
  ``~/.ray``. In-process, Ray caches the mode and the token, so ``ray_driver`` refreshes both
  (``Config.initialize("")``, ``AuthenticationTokenLoader.reset_cache()``) on entry and exit.
* Two nodes share the IP 127.0.0.1: a driver picks the local raylet by ps-grepping, so
  ``ray_driver`` passes ``_temp_dir=head.temp_dir`` to pick the head.
* Ray listens on IPv4-mapped ``::ffff:127.0.0.1`` (dual-stack sockets): that is 127.0.0.1.
* Every Ray process gets ``RAY_USAGE_STATS_ENABLED=0`` (no report to the outside), and the head
  a fixed free ``--dashboard-agent-listen-port`` (the default 52365 collides with any other
  Ray on the machine).
* A tmpfs mounted over the launcher's cwd does not change the cwd it already holds (it still
  reaches the hidden files): the launcher starts in ``/`` and changes into its private dir.
* Ray's dashboard / runtime-env agents are started by the raylet with a fresh environment (no
  marker), hence the session check in ``processes()``.
* The Node launcher's processes inherit the node's environment; a ``ray.remote`` task there sees
  its private tmpfs as cwd and ``TMPDIR``.

And with the servers:

* SQLAlchemy 2.1 (under mlflow 3.17 and optuna 5.0) maps ``postgresql://`` to psycopg 3, which
  is not installed ("No module named 'psycopg'"): the SQLAlchemy URLs are
  ``postgresql+psycopg2://`` (``sqlalchemy_url``, ``Postgres.mlflow_uri`` / ``optuna_uri``).
* PostgreSQL 15 refuses to run as root, and the ``postgres`` user cannot enter pytest's
  ``/tmp/pytest-of-root`` (0700): hence ``make_root()`` (0711) and a checked subfolder.
* ``mlflow server`` defaults to 4 uvicorn workers: 1 here (2 CPU cores). Its first start on an
  empty database runs the migrations (about 10 s).
* moto's server needs no bucket configuration; boto3 gets explicit credentials and
  ``AWS_EC2_METADATA_DISABLED`` so nothing probes the instance metadata address.
* Isolation is of the disk only: the node shares the host's PID and network namespaces (a
  process could still reach hidden files through ``/proc/<host pid>/root``; the tests do not).
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

LOOPBACK = "127.0.0.1"
MARKER_ENV = "CLUSTER_HARNESS_ID"
PG_BIN = Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))
READY = "CLUSTER_HARNESS_NODE_READY"
# environment that must not leak from the test process into a service
_DROP_ENV = ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "RAY_AUTH_TOKEN_PATH")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def make_root(prefix: str = "bsc-") -> Path:
    """A fresh, short folder in the system temp dir that other users can traverse (0711)."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o711)
    return root


def _wait(pred, timeout: float, what: str, service: _Service | None = None, interval: float = 0.2):
    """Poll ``pred()`` until it returns a truthy value; fail with the service's log after
    ``timeout`` seconds, or at once when the service's process has exited."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            value = pred()
            if value:
                return value
        except Exception as e:  # noqa: BLE001 - kept for the error message
            last = e
        if service is not None and service.popen.poll() is not None:
            raise RuntimeError(f"{service.name} exited ({service.popen.returncode}) before {what}\n"
                               f"{service.log_tail()}")
        if time.monotonic() > deadline:
            tail = service.log_tail() if service is not None else ""
            raise TimeoutError(f"{what}: not within {timeout:.0f} s (last error: {last!r})\n{tail}")
        time.sleep(interval)


def _base_env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _DROP_ENV}
    env.update(extra or {})
    return env


class _Service:
    """One process started in its own session, with a marker every descendant inherits."""

    def __init__(self, name: str, cmd: list, log_path: Path, env: dict | None = None, cwd: str = "/",
                 user: str | None = None, stop_signal: int = signal.SIGTERM):
        self.name = name
        self.marker = f"{name}-{secrets.token_hex(6)}"
        self.log_path = Path(log_path)
        self.stop_signal = stop_signal
        env = dict(os.environ if env is None else env)
        env[MARKER_ENV] = self.marker
        kwargs = {}
        if user is not None:
            kwargs = {"user": user, "group": user, "extra_groups": []}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:   # the child keeps its own copy of the fd
            self.popen = subprocess.Popen([str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, env=env, cwd=cwd, start_new_session=True,
                                          **kwargs)

    def log_tail(self, n: int = 40) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(f"  [{self.name}] {line}" for line in lines[-n:])

    def processes(self) -> list:
        """Every live process of this service (psutil.Process): those in its session, and those
        that carry its marker (Ray's agents get a fresh environment, its workers may leave)."""
        import psutil

        out = []
        for p in psutil.process_iter():
            try:
                if p.pid == os.getpid() or p.status() == psutil.STATUS_ZOMBIE:
                    continue
                if os.getsid(p.pid) == self.popen.pid or p.environ().get(MARKER_ENV) == self.marker:
                    out.append(p)
            except (psutil.Error, OSError):
                continue
        return out

    def _sweep(self, timeout: float = 10):
        import psutil

        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while True:
            left = self.processes()
            for p in left:
                with contextlib.suppress(psutil.Error):
                    p.kill()
            if not left or time.monotonic() > deadline:
                break
            psutil.wait_procs(left, timeout=1)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=5)

    def kill(self):
        """SIGKILL the whole service at once (no shutdown)."""
        self._sweep()

    def stop(self, grace: float = 20):
        """Shutdown signal, a bounded wait, then SIGKILL of whatever is left."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(self.stop_signal)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=grace)
        self._sweep()


@dataclass
class _Handle:
    service: _Service = field(repr=False)

    def processes(self) -> list:
        return self.service.processes()

    def stop(self):
        self.service.stop()


# =============================================================================== PostgreSQL

def sqlalchemy_url(dsn: str) -> str:
    """``postgresql://`` -> ``postgresql+psycopg2://``: SQLAlchemy 2.1 (MLflow's and Optuna's
    storage) maps a bare ``postgresql://`` to psycopg 3, which is not installed."""
    return "postgresql+psycopg2://" + dsn.split("://", 1)[1] if dsn.startswith("postgresql://") else dsn


@dataclass
class Postgres(_Handle):
    """``dsn``: MLflow's database (role ``mlflow``); ``optuna_dsn``: Optuna's (role ``optuna``);
    libpq form (psycopg2.connect); ``mlflow_uri`` / ``optuna_uri``: the same as SQLAlchemy URLs."""
    dsn: str = ""
    optuna_dsn: str = ""
    admin_dsn: str = ""
    port: int = 0
    data_dir: Path | None = None

    @property
    def mlflow_uri(self) -> str:
        return sqlalchemy_url(self.dsn)

    @property
    def optuna_uri(self) -> str:
        return sqlalchemy_url(self.optuna_dsn)

    def stop(self):
        self.service.stop(grace=30)


def _dsn(user, password, port, db, host=LOOPBACK):
    return f"postgresql://{user}:{password}@{host}:{port}/{db}"


def start_postgres(tmp_dir, timeout: float = 60, host: str = LOOPBACK,
                   roles: tuple[str, ...] = ("mlflow", "optuna")) -> Postgres:
    """initdb + postgres in ``tmp_dir/postgres`` listening on ``host``; for each of ``roles`` (those
    of ``mlflow`` and ``optuna`` fill ``dsn`` / ``optuna_dsn``) a login role and a database it owns."""
    import psycopg2

    base = Path(tmp_dir) / "postgres"
    data, sock = base / "data", base / "sock"
    sock.mkdir(parents=True)
    user = None
    if os.geteuid() == 0:   # postgres refuses to run as root
        import pwd

        user = "postgres"
        pw = pwd.getpwnam(user)
        for p in (base, sock):
            os.chown(p, pw.pw_uid, pw.pw_gid)
        probe = subprocess.run(["test", "-x", str(base)], check=False, user=user, group=user, extra_groups=[])
        if probe.returncode != 0:
            raise RuntimeError(f"the postgres user cannot reach {base}: use a folder from make_root()")
    base.chmod(0o700)
    admin_pw = secrets.token_hex(12)
    pwfile = base / "pwfile"
    pwfile.write_text(admin_pw + "\n")
    if user:
        os.chown(pwfile, pw.pw_uid, pw.pw_gid)
    initdb = subprocess.run([str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "-E", "UTF8",
                             "--auth=scram-sha-256", f"--pwfile={pwfile}", "--no-sync", "--no-instructions"],
                            check=False, capture_output=True, text=True, cwd=str(base), env=_base_env({"LC_ALL": "C.UTF-8"}),
                            **({"user": user, "group": user, "extra_groups": []} if user else {}))
    pwfile.unlink()
    if initdb.returncode != 0:
        raise RuntimeError(f"initdb failed:\n{initdb.stdout}\n{initdb.stderr}")
    with open(data / "pg_hba.conf", "a") as hba:   # the hosts of the subnet ``host`` is on (a namespace's)
        hba.write("host all all samenet scram-sha-256\n")
    for _attempt in range(3):   # the free port may be taken before postgres binds it
        port = free_port()
        svc = _Service("postgres", [PG_BIN / "postgres", "-D", data, "-p", port,
                                    "-c", f"listen_addresses={host}", "-c", f"unix_socket_directories={sock}",
                                    "-c", "fsync=off", "-c", "synchronous_commit=off",
                                    "-c", "full_page_writes=off", "-c", "max_connections=200"],
                       Path(tmp_dir) / "logs" / "postgres.log", env=_base_env({"LC_ALL": "C.UTF-8"}),
                       cwd=str(base), user=user, stop_signal=signal.SIGINT)
        admin = _dsn("postgres", admin_pw, port, "postgres", host)
        try:
            _wait(lambda dsn=admin: psycopg2.connect(dsn, connect_timeout=2).close() or True, timeout,
                  "postgres accepting connections", svc)
            break
        except RuntimeError:
            svc.stop()
            if "already in use" not in svc.log_tail():
                raise
    else:
        raise RuntimeError("postgres: no free port after 3 tries")
    handle = Postgres(svc, admin_dsn=admin, port=port, data_dir=data)
    conn = psycopg2.connect(admin)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            for role in roles:
                password = secrets.token_hex(12)
                cur.execute(f"CREATE ROLE {role} LOGIN PASSWORD %s", (password,))
                cur.execute(f"CREATE DATABASE {role} OWNER {role}")
                if role in ("mlflow", "optuna"):
                    setattr(handle, "dsn" if role == "mlflow" else "optuna_dsn", _dsn(role, password, port, role, host))
    except Exception:
        conn.close()
        handle.stop()
        raise
    conn.close()
    return handle


# =============================================================================== MLflow

@dataclass
class MlflowServer(_Handle):
    url: str = ""
    artifacts_dir: Path | None = None


def start_mlflow_server(dsn: str, artifacts_dir, log_dir=None, timeout: float = 180, host: str = LOOPBACK) -> MlflowServer:
    """``python -m mlflow server`` on ``dsn`` (libpq or SQLAlchemy form) with artifacts proxied
    into ``artifacts_dir``."""
    artifacts_dir = Path(artifacts_dir)
    artifacts_dir.mkdir(parents=True, exist_ok=True)
    log_dir = Path(log_dir) if log_dir else artifacts_dir.parent / "logs"
    port = free_port()
    svc = _Service("mlflow", [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", sqlalchemy_url(dsn),
                              "--serve-artifacts", "--artifacts-destination", artifacts_dir,
                              "--host", host, "--port", port, "--workers", "1"],
                   log_dir / "mlflow.log", env=_base_env(), cwd=str(artifacts_dir.parent))
    url = f"http://{host}:{port}"

    def healthy():
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200

    try:
        _wait(healthy, timeout, "mlflow /health", svc, interval=0.5)
    except Exception:
        svc.stop()
        raise
    return MlflowServer(svc, url=url, artifacts_dir=artifacts_dir)


# =============================================================================== S3 (moto)

@dataclass
class S3(_Handle):
    endpoint: str = ""
    bucket: str = ""
    env: dict = field(default_factory=dict)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=self.env["AWS_DEFAULT_REGION"],
                            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"])


def start_s3(tmp_dir, bucket: str = "sweep", timeout: float = 60, host: str = LOOPBACK) -> S3:
    """A moto S3 server subprocess on ``host`` with ``bucket`` created through boto3."""
    port = free_port()
    svc = _Service("moto", [sys.executable, "-m", "moto.server", "-H", host, "-p", port],
                   Path(tmp_dir) / "logs" / "moto.log", env=_base_env())
    endpoint = f"http://{host}:{port}"
    env = {"AWS_ACCESS_KEY_ID": "harness", "AWS_SECRET_ACCESS_KEY": "harness-secret",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint, "AWS_EC2_METADATA_DISABLED": "true"}
    handle = S3(svc, endpoint=endpoint, bucket=bucket, env=env)
    try:
        _wait(lambda: handle.client().list_buckets() is not None, timeout, "moto answering", svc, interval=0.3)
        handle.client().create_bucket(Bucket=bucket)
    except Exception:
        svc.stop()
        raise
    return handle


# =============================================================================== Ray

def _ray_env(token: str, extra: dict | None = None) -> dict:
    """What every process of one cluster needs: loopback, its auth token, no usage report."""
    return {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
            "RAY_USAGE_STATS_ENABLED": "0", **(extra or {})}


@dataclass
class RayHead(_Handle):
    address: str = ""
    temp_dir: Path | None = None
    env: dict = field(default_factory=dict)

    def stop(self):
        self.service.stop(grace=30)


def start_ray_head(tmp_dir, num_cpus: int = 1, env: dict | None = None, resources: dict | None = None,
                   object_store_mb: int = 100, timeout: float = 120, host: str = LOOPBACK) -> RayHead:
    """``ray start --head --block`` on ``host`` with its own temp dir and auth token. ``env``:
    extra environment of the head's processes (its workers inherit it), e.g. ``RAY_<config>``."""
    temp_dir = Path(tmp_dir) / "ray"
    temp_dir.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(32)
    cluster_env = _ray_env(token)
    ray_cli = Path(sys.executable).with_name("ray")
    for _attempt in range(3):
        port = free_port()
        cmd = [ray_cli if ray_cli.exists() else sys.executable, *([] if ray_cli.exists() else ["-m", "ray.scripts.scripts"]),
               "start", "--head", "--block", "--node-ip-address", host, "--port", port,
               "--num-cpus", num_cpus, "--include-dashboard", "false", "--temp-dir", temp_dir,
               "--disable-usage-stats", "--dashboard-agent-listen-port", free_port(),
               "--object-store-memory", object_store_mb * 1024 * 1024]
        if resources:
            cmd += ["--resources", json.dumps(resources)]
        svc = _Service("ray-head", cmd, Path(tmp_dir) / "logs" / "ray-head.log",
                       env=_base_env({**cluster_env, **(env or {})}))
        try:
            _wait(lambda log=svc.log_path: "Ray runtime started" in log.read_text(errors="replace"), timeout,
                  "ray head started", svc, interval=0.3)
            break
        except RuntimeError:
            svc.stop()
            if "already in use" not in svc.log_tail(200) and "is not available" not in svc.log_tail(200):
                raise
    else:
        raise RuntimeError("ray head: no free port after 3 tries")
    return RayHead(svc, address=f"{host}:{port}", temp_dir=temp_dir, env=cluster_env)


@dataclass
class WorkerNode(_Handle):
    node_id: str = ""
    resources: dict = field(default_factory=dict)
    owned_dir: Path | None = None   # made by the harness (no ``node_dir`` given): removed on stop

    def kill(self):
        """SIGKILL every process of the node at once (node loss)."""
        self.service.kill()
        self._remove_owned()

    def stop(self):
        self.service.stop()
        self._remove_owned()

    def _remove_owned(self):
        if self.owned_dir is not None:
            shutil.rmtree(self.owned_dir, ignore_errors=True)


def start_isolated_worker_node(head_address: str, hidden_dirs, num_cpus: int = 1, resources: dict | None = None,
                               env: dict | None = None, *, head: RayHead | None = None, node_dir=None,
                               object_store_mb: int = 100, timeout: float = 120, host: str = LOOPBACK) -> WorkerNode:
    """A Ray node in its own process and mount namespace: a tmpfs over each of ``hidden_dirs``
    and over ``node_dir`` (its Ray temp dir and cwd; keep the path short; default: a fresh
    folder in the system temp dir). Its log: ``node_dir/../logs/ray-<node_dir name>.log``.
    ``env``: extra environment of the node's processes (e.g. S3 credentials); the cluster's
    auth variables come from ``head`` (``head.env``) or must be in ``env``. Needs root (mount)."""
    auth = {**(head.env if head is not None else {}), **(env or {})}
    if not auth.get("RAY_AUTH_TOKEN"):
        raise ValueError("the node needs the cluster's auth token: pass head= or env={**head.env, ...}")
    owned = None
    if node_dir is None:
        owned = make_root("bsn-")
        node_dir = owned / "node"
    node_dir = Path(node_dir)
    name = f"ray-{node_dir.name}"
    cfg = {"gcs_address": head_address, "hidden_dirs": [str(Path(d).resolve()) for d in hidden_dirs],
           "node_dir": str(node_dir.resolve()), "num_cpus": num_cpus, "resources": resources or {},
           "object_store_memory": object_store_mb * 1024 * 1024, "host": host}
    log = node_dir.resolve().parent / "logs" / f"{name}.log"
    if log.exists():
        log.unlink()
    cmd = ["unshare", "--mount", "--propagation", "private", sys.executable, Path(__file__).resolve(),
           "worker-node", json.dumps(cfg)]
    svc = _Service(name, cmd, log, env=_base_env(_ray_env(auth["RAY_AUTH_TOKEN"], auth)))
    handle = WorkerNode(svc, resources=dict(resources or {}), owned_dir=owned)

    def ready():
        for line in svc.log_path.read_text(errors="replace").splitlines():
            if line.startswith(READY):
                return line.split()[1]
        return None

    try:
        handle.node_id = _wait(ready, timeout, f"{name} joined the cluster", svc, interval=0.3)
    except Exception:
        handle.stop()
        raise
    return handle


@contextlib.contextmanager
def ray_driver(head: RayHead, **init_kwargs):
    """Join this process to ``head`` as a driver; on exit ``ray.shutdown()`` and restore the
    environment and Ray's cached auth state."""
    import ray
    from ray._raylet import AuthenticationTokenLoader, Config

    def refresh_auth():
        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()

    saved = {k: os.environ.get(k) for k in head.env}
    os.environ.update(head.env)
    refresh_auth()
    try:
        ray.init(address=head.address, _temp_dir=str(head.temp_dir), **init_kwargs)
        yield ray
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        refresh_auth()


# =============================================================================== network namespaces

CLONE_NEWNET = 0x40000000


def _ip(*args: str):
    r = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")


@contextlib.contextmanager
def in_netns(name: str):
    """Run the calling thread in the network namespace ``name`` (``/run/netns/<name>``) and bring
    it back on exit. setns(2) moves one thread only; the processes and threads it starts meanwhile
    are born in ``name`` and stay there, and so do the sockets it opens."""
    libc = ctypes.CDLL(None, use_errno=True)
    with open("/proc/thread-self/ns/net") as back, open(f"/run/netns/{name}") as target:
        if libc.setns(target.fileno(), CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {name}")
        try:
            yield
        finally:
            if libc.setns(back.fileno(), CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")


@dataclass
class Network:
    """Hosts on one private subnet: each host a network namespace of its own with one interface
    (``eth0``) whose peer is a port of a bridge that lives in a namespace of its own too, so that
    nothing is added to the machine's own network. ``address[host]``; ``cut(host)`` takes the
    host's link down (its processes live on, unreachable), ``delete()`` removes every namespace
    (and with them their links)."""
    tag: str
    address: dict = field(default_factory=dict)

    def netns(self, host: str) -> str:
        return f"{self.tag}-{host}"

    def enter(self, host: str):
        return in_netns(self.netns(host))

    def cut(self, host: str):
        _ip("-n", self.netns(host), "link", "set", "eth0", "down")

    def delete(self):
        for name in [*(self.netns(h) for h in self.address), f"{self.tag}-br"]:
            if Path(f"/run/netns/{name}").exists():
                _ip("netns", "delete", name)


def make_network(hosts, subnet: str = "10.77.0") -> Network:
    """Namespaces ``<tag>-<host>`` with ``<subnet>.<i>/24`` (i = 1, 2, ... in ``hosts``' order) on
    ``eth0`` and their loopback up, joined by a bridge in ``<tag>-br``. The tag is random: other
    runs on the machine make their own. Needs root."""
    net = Network(tag=f"bs{secrets.token_hex(3)}")
    bridge = f"{net.tag}-br"
    try:
        _ip("netns", "add", bridge)
        _ip("-n", bridge, "link", "add", "br0", "type", "bridge")
        for dev in ("lo", "br0"):
            _ip("-n", bridge, "link", "set", dev, "up")
        for i, host in enumerate(hosts, 1):
            ns = net.netns(host)
            net.address[host] = f"{subnet}.{i}"
            _ip("netns", "add", ns)
            _ip("-n", bridge, "link", "add", f"v{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("-n", bridge, "link", "set", f"v{i}", "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{net.address[host]}/24", "dev", "eth0")
            for dev in ("lo", "eth0"):
                _ip("-n", ns, "link", "set", dev, "up")
    except Exception:
        net.delete()
        raise
    return net


# =============================================================================== checks

def start_servers(root: Path, started: list, host: str = LOOPBACK) -> tuple["Postgres", "MlflowServer", "S3"]:
    """PostgreSQL, an MLflow server on it (artifacts proxied to ``root/mlflow-artifacts``) and a
    moto S3 server, all on ``host``, each appended to ``started`` as soon as it runs (so a later
    failure still stops it: :func:`stop_all`)."""
    pg = start_postgres(root, host=host)
    started.append(pg)
    mlflow = start_mlflow_server(pg.dsn, root / "mlflow-artifacts", root / "logs", host=host)
    started.append(mlflow)
    s3 = start_s3(root, host=host)
    started.append(s3)
    return pg, mlflow, s3


def stop_all(started: list, root: Path) -> list:
    """Stop every handle in ``started`` (last first), remove ``root``; returns the processes that
    outlived their handle's stop() (a test asserts there are none)."""
    for handle in reversed(started):
        handle.stop()
    leftovers = [p for handle in started for p in handle.processes()]
    shutil.rmtree(root, ignore_errors=True)
    return leftovers


def listening_sockets(processes) -> list[tuple[int, str, str, int]]:
    """(pid, process name, ip, port) of each listening TCP socket and bound UDP socket."""
    import psutil

    out = []
    for p in processes:
        try:
            conns = p.net_connections(kind="inet")
            name = p.name()
        except psutil.Error:
            continue
        for c in conns:
            if (c.type == socket.SOCK_STREAM and c.status == psutil.CONN_LISTEN) or \
                    (c.type == socket.SOCK_DGRAM and c.laddr):
                out.append((p.pid, name, c.laddr.ip, c.laddr.port))
    return out


def is_loopback_127(ip: str) -> bool:
    """127.0.0.1, also as the IPv4-mapped IPv6 address of a dual-stack socket."""
    return ip in (LOOPBACK, f"::ffff:{LOOPBACK}")


# =============================================================================== the node launcher

def _worker_node_main(cfg: dict) -> int:
    """Runs inside ``unshare --mount``: hide the dirs, start a non-head Ray node, wait forever
    (SIGTERM: Ray's own handler stops the node's processes)."""
    def tmpfs(path):
        subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755,size=512m", "cluster-harness", path], check=True)

    for d in cfg["hidden_dirs"]:
        tmpfs(d)
    node_dir = cfg["node_dir"]
    os.makedirs(node_dir, exist_ok=True)
    tmpfs(node_dir)
    os.chdir(node_dir)
    os.makedirs(os.path.join(node_dir, "tmp"))
    os.environ["TMPDIR"] = os.path.join(node_dir, "tmp")

    import ray
    import ray._private.node
    import ray._private.parameter
    import ray._private.services

    params = ray._private.parameter.RayParams(
        node_ip_address=cfg["host"], gcs_address=cfg["gcs_address"], num_cpus=cfg["num_cpus"], num_gpus=0,
        resources=cfg["resources"], object_store_memory=cfg["object_store_memory"],
        temp_dir=os.path.join(node_dir, "ray"), node_manager_port=0, min_worker_port=0, max_worker_port=0,
        dashboard_agent_listen_port=None, include_log_monitor=True)
    node = ray._private.node.Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
    ray._private.services.wait_for_node(node.gcs_address, node.plasma_store_socket_name, 60)
    print(f"{READY} {node.node_id}", flush=True)
    while True:
        signal.pause()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "worker-node":
        sys.exit(_worker_node_main(json.loads(sys.argv[2])))
    sys.exit(f"usage: {sys.argv[0]} worker-node <json config>")

"""A team's services, real and on loopback, started and stopped by the tests: PostgreSQL (Debian's
package), an S3 server (SeaweedFS's S3 gateway) and `mlflow server` on both. Credentials are made per
run and never written anywhere but the services' own configuration and the processes' environments."""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """A server in its own process group that a test can stop and start again (same command, port and data):
    an outage of one of the team's services. Its log is appended to across starts."""

    def __init__(self, args: list[str], ready: Callable[[], bool], log_path: Path, env: dict | None = None,
                 timeout: float = 120, cwd: Path | None = None, grace: float = 30,
                 stop_signal: signal.Signals = signal.SIGTERM):
        self.args, self.ready, self.log_path, self.env = args, ready, log_path, env
        self.timeout, self.cwd, self.grace, self.stop_signal = timeout, cwd, grace, stop_signal
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        """Starts it and waits until `ready()` is true."""
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen(self.args, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True, cwd=self.cwd)
        deadline = time.monotonic() + self.timeout
        while not self.ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.args[0]} exited with {self.proc.returncode}:\n"
                                   f"{self.log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.args[0]} not ready in {self.timeout} s:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.3)

    def stop(self) -> None:
        """Stops the whole group: its stop signal (SIGTERM), then SIGKILL after `grace` seconds."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, self.stop_signal)
        try:
            self.proc.wait(timeout=self.grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def __enter__(self) -> Service:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def process(args: list[str], ready: Callable[[], bool], log_path: Path, env: dict | None = None,
            timeout: float = 120, cwd: Path | None = None, grace: float = 30) -> Iterator[int]:
    """Starts a server in its own process group, waits until `ready()` is true, yields its PID and stops
    the whole group afterwards (SIGTERM, then SIGKILL after `grace` seconds)."""
    log_path.write_text("")
    with Service(args, ready, log_path, env, timeout, cwd, grace) as service:
        yield service.pid


def answers(url: str) -> Callable[[], bool]:
    """A readiness check: `url` answers 200."""
    import urllib.request

    def ready() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    return ready


def postgres_bin() -> Path | None:
    """The folder of Debian's PostgreSQL server programs (initdb, postgres), newest version first."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]), reverse=True)
    return Path(found[0]).parent if found else None


@dataclass(frozen=True)
class Postgres:
    port: int
    user: str
    password: str
    service: Service | None = field(default=None, compare=False)

    def url(self, database: str) -> str:
        """The database's URL without the password: libpq takes it from PGPASSWORD (env()), so it appears
        on no command line and in no configuration file."""
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def env(self) -> dict[str, str]:
        return {"PGPASSWORD": self.password}

    def connect(self, database: str = "postgres"):
        import psycopg

        return psycopg.connect(self.url(database), password=self.password, autocommit=True, connect_timeout=5)

    def create_database(self, name: str) -> str:
        with self.connect() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


@contextlib.contextmanager
def postgres(root: Path) -> Iterator[Postgres]:
    """A PostgreSQL server in a fresh data directory under `root`, on a free loopback port, with a
    password made for this run. As root it runs as the `postgres` user (initdb refuses root)."""
    import psycopg

    programs = postgres_bin()
    if programs is None:
        raise RuntimeError("PostgreSQL's server is not installed: apt-get install postgresql")
    root.mkdir(parents=True, exist_ok=True)
    as_user: list[str] = []
    # the data directory lies where the server's user can reach it (pytest's folders are private to root)
    data = Path(tempfile.mkdtemp(prefix="fashioncap-pg-"))
    if os.geteuid() == 0:
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(data, "postgres")
    password = secrets.token_urlsafe(18)
    pwfile = data / "pw"
    pwfile.write_text(password + "\n")
    if as_user:
        shutil.chown(pwfile, "postgres")
    init = subprocess.run([*as_user, str(programs / "initdb"), "-D", str(data / "data"), "-U", "fashioncap",
                           "--auth=scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8", "--no-instructions"],
                          capture_output=True, text=True)
    pwfile.unlink()
    if init.returncode != 0:
        shutil.rmtree(data, ignore_errors=True)
        raise RuntimeError(f"initdb failed: {init.stderr.strip()[-2000:]}")
    server = Postgres(free_port(), "fashioncap", password)

    def ready() -> bool:
        try:
            server.connect().close()
            return True
        except psycopg.OperationalError:
            return False

    args = [*as_user, str(programs / "postgres"), "-D", str(data / "data"), "-h", "127.0.0.1",
            "-p", str(server.port), "-k", str(data)]
    try:
        # SIGINT is PostgreSQL's fast shutdown: it does not wait for the tracking server's pooled connections
        with Service(args, ready, root / "postgres.log", timeout=60, stop_signal=signal.SIGINT) as service:
            yield dataclasses.replace(server, service=service)
    finally:
        shutil.rmtree(data, ignore_errors=True)


@dataclass(frozen=True)
class S3:
    endpoint: str
    access_key: str
    secret_key: str
    service: Service | None = field(default=None, compare=False)

    def env(self) -> dict[str, str]:
        """What boto3 (MLflow's S3 artifact store) reads."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_DEFAULT_REGION": "us-east-1", "MLFLOW_S3_ENDPOINT_URL": self.endpoint}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name="us-east-1")

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]


@contextlib.contextmanager
def s3_server(root: Path, buckets: tuple[str, ...]) -> Iterator[S3]:
    """SeaweedFS (master, volume, filer and S3 gateway in one process) on loopback ports, with one
    access key made for this run; the buckets are created before it is handed out."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "data").mkdir(exist_ok=True)
    with contextlib.ExitStack() as stack:
        # a free port can be taken before the server binds it (an outgoing connection of a parallel test worker
        # gets one from the same range): a start that fails so is tried again on other ports
        for attempt in range(3):
            store, args = _s3_command(root)
            try:
                # SeaweedFS takes ~25 s to shut down gracefully; its data is thrown away, so 3 s is enough
                service = stack.enter_context(Service(args, _s3_ready(store, buckets), root.parent / f"{root.name}.log",
                                                      timeout=90, grace=3))
                break
            except RuntimeError as error:
                if "address already in use" not in str(error) or attempt == 2:
                    raise
        yield dataclasses.replace(store, service=service)


def _s3_command(root: Path) -> tuple[S3, list[str]]:
    # the secret starts with '-', as one random key in 64 does: every command that is handed it must take it
    # as a value, not as an option (`dvc remote modify ... secret_access_key -- KEY`)
    store = S3(f"http://127.0.0.1:{free_port()}", "fc" + secrets.token_hex(8), "-" + secrets.token_urlsafe(24))
    config = root / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "fashioncap", "credentials": [{"accessKey": store.access_key, "secretKey": store.secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    ports = {name: free_port() for name in ("master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc",
                                            "s3.grpc")}
    args = [str(BIN / "weed"), "server", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            *[f"-{name.replace('.grpc', '.port.grpc') if name.endswith('.grpc') else name + '.port'}={port}"
              for name, port in ports.items()],
            "-filer", "-s3", f"-s3.port={store.endpoint.rsplit(':', 1)[1]}", f"-s3.config={config}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-volume.max=64", "-master.volumeSizeLimitMB=64",
            # one master, no peers to wait for: its Raft election timeout (10 s by default) is how long a start
            # waits before it leads (started 9.5 s and restarted in 18-20 s with it, 3.5 s and 4-7 s with 1 s)
            "-master.electionTimeout=1s"]
    return store, args


def _s3_ready(store: S3, buckets: tuple[str, ...]) -> Callable[[], bool]:
    def ready() -> bool:
        try:
            for bucket in buckets:
                with contextlib.suppress(store.client().exceptions.BucketAlreadyOwnedByYou):
                    store.client().create_bucket(Bucket=bucket)
            return True
        except Exception:  # not up yet: connection refused, or the filer not ready
            return False

    return ready


@contextlib.contextmanager
def mlflow_server(root: Path, backend: str, artifacts: str, env: dict[str, str], app: str | None = None,
                  extra_env: dict[str, str] | None = None) -> Iterator[str]:
    """`mlflow server` (one worker, no job execution) with its artifacts proxied (`--serve-artifacts`);
    returns its URL."""
    with mlflow_service(root, backend, artifacts, env, app, extra_env) as (url, _):
        yield url


@contextlib.contextmanager
def mlflow_service(root: Path, backend: str, artifacts: str, env: dict[str, str], app: str | None = None,
                   extra_env: dict[str, str] | None = None) -> Iterator[tuple[str, Service]]:
    """mlflow_server(), with the Service that stops and starts it again."""
    port = free_port()
    full_env = {**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(extra_env or {})}
    full_env.pop("MLFLOW_TRACKING_URI", None)
    args = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--backend-store-uri", backend, "--artifacts-destination", artifacts, "--serve-artifacts",
            *(["--app-name", app] if app else [])]

    root.mkdir(parents=True, exist_ok=True)
    with Service(args, answers(f"http://127.0.0.1:{port}/health"), root / "server.log", env=full_env,
                 cwd=root) as service:
        yield f"http://127.0.0.1:{port}", service


DVC_BUCKET, MLFLOW_BUCKET = "dvc", "mlflow"


@dataclass(frozen=True)
class Services:
    url: str  # the tracking server
    s3: S3
    pg: Postgres
    root: Path
    server: Service  # the tracking server's process, to stop and start again


@contextlib.contextmanager
def team_services(root: Path) -> Iterator[Services]:
    """PostgreSQL, the S3 server with the DVC and MLflow buckets, and `mlflow server` on both."""
    with postgres(root / "pg") as pg, s3_server(root / "s3", (DVC_BUCKET, MLFLOW_BUCKET)) as s3:
        backend = pg.create_database("mlflow")
        with mlflow_service(root / "mlflow", backend, f"s3://{MLFLOW_BUCKET}/artifacts",
                            {**os.environ, **s3.env(), **pg.env()}) as (url, server):
            yield Services(url, s3, pg, root, server)

"""Shared fixtures: Ray on loopback with a temporary RAY_TMPDIR, a temporary working directory,
and a PostgreSQL-backed `mlflow server` on 127.0.0.1 (both started by the tests themselves).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

# Ray on loopback only (without this Ray binds all interfaces) with a short temporary session dir
# (Ray's unix socket paths have a length limit). Set before any test imports/starts Ray.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="rt_", dir="/tmp"))
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
for _var in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
    os.environ.pop(_var, None)

# A 2-D toy workload small enough for 2 CPU cores: 50 steps, an evaluation every 10 steps.
TINY_WORKLOAD = {
    "data": {"name": "ring_mog"},
    "batch_size": 64,
    "generator": {"hidden_dim": 32, "num_layers": 2},
    "total_steps": 50,
    "eval_every_steps": 10,
    "eval": {"num_samples": 200, "swd_projections": 50},
    "device": "cpu",
}
EVAL_STEPS = [10, 20, 30, 40, 50]

PG_BIN = Path("/usr/lib/postgresql/15/bin")
SERVER_START_TIMEOUT_S = 120


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def tmp_cwd(tmp_path, monkeypatch) -> Path:
    """Run the test in its own empty working directory (the embedded defaults write there)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def write_plan(tmp_cwd):
    """Write a plan YAML into the test's working directory (tiny workload unless overridden).

    Returns:
        write(name, axes, **sections) -> Path of the plan file.
    """

    def write(name: str, axes: dict, **sections) -> Path:
        plan = {"name": name, "seed": 7, "workload": dict(TINY_WORKLOAD), "axes": axes,
                "resources": {"cpus_per_trial": 1, "max_concurrent": 2}, **sections}
        path = tmp_cwd / f"{name}.yaml"
        path.write_text(yaml.safe_dump(plan))
        return path

    return write


def _as_postgres(args: list[str]) -> list[str]:
    """initdb/pg_ctl refuse to run as root: run them as the `postgres` system user then."""
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *args]
    return args


@pytest.fixture(scope="session")
def postgres_uri():
    """A private PostgreSQL 15 cluster in a temp dir (unix socket only), database `mlflow`.

    Yields:
        An SQLAlchemy URI `postgresql+psycopg2://postgres@/mlflow?host=<socket dir>&port=<port>`.
    """
    if not (PG_BIN / "initdb").exists():
        pytest.fail(f"PostgreSQL 15 binaries not found in {PG_BIN}")
    root = Path(tempfile.mkdtemp(prefix="pg_", dir="/tmp"))
    data = root / "data"
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    port = free_port()
    subprocess.run(_as_postgres([str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                                 "-E", "UTF8"]), check=True, capture_output=True)
    subprocess.run(
        _as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(root / "pg.log"), "-w", "start",
                      "-o", f"-c listen_addresses='' -c unix_socket_directories={root} -p {port}"]),
        check=True, capture_output=True,
    )
    try:
        subprocess.run(_as_postgres([str(PG_BIN.parent / "bin" / "createdb"), "-h", str(root), "-p", str(port),
                                     "-U", "postgres", "mlflow"]), check=True, capture_output=True)
        yield f"postgresql+psycopg2://postgres@/mlflow?host={root}&port={port}"
    finally:
        subprocess.run(_as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def start_mlflow_server(backend_uri: str, port: int, root: Path) -> subprocess.Popen:
    """`mlflow server` on 127.0.0.1:port (served artifacts under root, log in root/server.log), in its
    own process group: it runs uvicorn as a child process, and a kill must reach both.

    Returns:
        The server process (not yet answering: see wait_for_server).
    """
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(root / "server.log", "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
             "--backend-store-uri", backend_uri, "--serve-artifacts",
             "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True,
        )


def wait_for_server(uri: str, process: subprocess.Popen, root: Path, timeout_s: float = SERVER_START_TIMEOUT_S) -> None:
    """Wait until the server at `uri` answers /health; fail the test with its log if it dies or times out."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(uri + "/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)


@pytest.fixture(scope="session")
def mlflow_server(postgres_uri):
    """`mlflow server` on 127.0.0.1 with the PostgreSQL backend store and served artifacts.

    Yields:
        The tracking URI http://127.0.0.1:<port>.
    """
    root = Path(tempfile.mkdtemp(prefix="mlfs_", dir="/tmp"))
    port = free_port()
    process = start_mlflow_server(postgres_uri, port, root)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(uri, process, root)
        yield uri
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def fresh_database(postgres_uri):
    """A new, empty database in the session's PostgreSQL (its own MLflow store, for one test module).

    Returns:
        Its SQLAlchemy URI.
    """
    import sqlalchemy

    name = f"t{os.getpid()}_{time.monotonic_ns()}"
    engine = sqlalchemy.create_engine(postgres_uri, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
    engine.dispose()
    return postgres_uri.replace("/mlflow?", f"/{name}?")

"""Real PostgreSQL and MLflow servers on 127.0.0.1 for the tests marked ``servers`` (tests/test_servers.py).

:class:`PostgresServer` runs Debian's PostgreSQL (``apt-get install -y postgresql``; ``make test`` and
``.ci/run`` install it when missing) in a temp dir, listening on a free loopback port with password
(SCRAM) authentication and no Unix socket. PostgreSQL refuses to run as root, so under root initdb and the
server run as the ``postgres`` system user the package creates (or ``pcl-postgres``, created here when absent).

:class:`MlflowServer` runs ``mlflow server`` (SQLite backend store, local artifact root served through the
server with ``--serve-artifacts``), optionally with MLflow's basic-auth app (``--app-name basic-auth``,
configured by the ini file ``MLFLOW_AUTH_CONFIG_PATH`` names: admin user, user store, default permission; the
admin's first password comes from ``MLFLOW_AUTH_ADMIN_PASSWORD``).

Both can be stopped and started again on the same port, which is how the fault tests take them away.
A missing server binary fails the test with the command that installs it; nothing is skipped.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests

INSTALL_POSTGRES = ("PostgreSQL server binaries (initdb, pg_ctl, postgres) not found: install them with "
                    "'apt-get install -y postgresql' (what make test and .ci/run do), or set PCL_PG_BIN to the "
                    "directory that holds them")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_bin() -> Path:
    candidates = [os.environ.get("PCL_PG_BIN", "")]
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True)
    if shutil.which("pg_ctl"):
        candidates.append(str(Path(shutil.which("pg_ctl")).resolve().parent))
    for d in candidates:
        if d and all((Path(d) / exe).exists() for exe in ("initdb", "pg_ctl", "postgres")):
            return Path(d)
    pytest.fail(INSTALL_POSTGRES)


def unprivileged_user() -> pwd.struct_passwd | None:
    """The account PostgreSQL runs as when the tests run as root (None when they do not)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "pcl-postgres"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            pass
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "pcl-postgres"],
                   check=True, capture_output=True)
    return pwd.getpwnam("pcl-postgres")


class PostgresServer:
    def __init__(self, password: str, user: str = "pcl", database: str = "optuna"):
        self.bin = postgres_bin()
        self.password, self.user, self.database = password, user, database
        self.account = unprivileged_user()
        # under /tmp itself: pytest's own temp root is private to root, and the server's account must reach it
        self.root = Path(tempfile.mkdtemp(prefix="pcl-pg-"))
        self.data, self.log = self.root / "data", self.root / "server.log"
        self.port = free_port()
        self._own(self.root)
        pwfile = self.root / "pwfile"
        pwfile.write_text(password + "\n")
        self._own(pwfile)
        self._run("initdb", "-D", str(self.data), "-U", user, "--auth=scram-sha-256", f"--pwfile={pwfile}",
                  "-E", "UTF8", "--no-sync", "--no-instructions")
        pwfile.unlink()
        self.start()
        import psycopg

        with psycopg.connect(self.url(database="postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{database}"')

    def _own(self, path: Path) -> None:
        if self.account is not None:
            os.chown(path, self.account.pw_uid, self.account.pw_gid)

    def _run(self, exe: str, *args: str) -> None:
        kwargs = {}
        if self.account is not None:
            kwargs = dict(user=self.account.pw_uid, group=self.account.pw_gid, extra_groups=[])
        proc = subprocess.run([str(self.bin / exe), *args], capture_output=True, text=True, cwd=self.root, **kwargs)
        if proc.returncode != 0:
            log = self.log.read_text()[-3000:] if self.log.exists() else ""
            pytest.fail(f"{exe} {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}\n{log}")

    def url(self, database: str | None = None, password: bool = True) -> str:
        auth = f"{self.user}:{self.password}" if password else self.user
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{database or self.database}"

    def start(self) -> None:
        # no Unix socket (-k ''), loopback only; fsync off: test data need not survive a power cut
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
                  "-o", f"-h 127.0.0.1 -p {self.port} -k '' -c fsync=off -c max_connections=100", "start")

    def stop(self, mode: str = "fast") -> None:
        """``fast``: clients are disconnected; ``immediate``: the server dies as in a crash."""
        self._run("pg_ctl", "-D", str(self.data), "-w", "-t", "60", "-m", mode, "stop")

    def close(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


class MlflowServer:
    ADMIN = "admin"

    def __init__(self, root: Path, auth_admin_password: str | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.backend = self.root / "mlflow.db"
        self.artifacts = self.root / "artifacts"
        self.log = self.root / "server.log"
        self.admin_password = auth_admin_password
        self.proc: subprocess.Popen | None = None
        self.env = dict(os.environ)
        for key in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            self.env.pop(key, None)
        if auth_admin_password is not None:
            ini = self.root / "basic_auth.ini"
            ini.write_text("[mlflow]\ndefault_permission = EDIT\n"
                           f"database_uri = sqlite:///{self.root / 'auth.db'}\n"
                           f"admin_username = {self.ADMIN}\n"
                           "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                           # checks a user's password once a minute, not (PBKDF2) on every request
                           "auth_cache_ttl_seconds = 60\n")
            self.env["MLFLOW_AUTH_CONFIG_PATH"] = str(ini)
            self.env["MLFLOW_AUTH_ADMIN_PASSWORD"] = auth_admin_password  # not in the ini: no password on disk
            self.env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = "pcl-tests-csrf-key"  # required by the auth app
        self.start()

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.backend}",
               "--artifacts-destination", str(self.artifacts), "--serve-artifacts", "--host", "127.0.0.1",
               "--port", str(self.port), "--workers", "1"]
        if self.admin_password is not None:
            cmd += ["--app-name", "basic-auth"]
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)  # its own group: stop() ends its workers too
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if requests.get(f"{self.uri}/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.stop()
        pytest.fail(f"mlflow server did not answer within 180 s:\n{self.log.read_text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        except ProcessLookupError:
            pass

    def create_user(self, username: str, password: str) -> None:
        response = requests.post(f"{self.uri}/api/2.0/mlflow/users/create", timeout=30,
                                 json={"username": username, "password": password},
                                 auth=(self.ADMIN, self.admin_password))
        assert response.status_code == 200, response.text

    def client(self, monkeypatch):
        """An MlflowClient of this server with the admin's credentials (for the tests' own queries; the
        credential variables are set through ``monkeypatch``, so the test's end restores them)."""
        from mlflow.tracking import MlflowClient

        if self.admin_password is not None:
            monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", self.ADMIN)
            monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", self.admin_password)
        return MlflowClient(self.uri)

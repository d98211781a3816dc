"""A real single-node Apache Kafka broker (KRaft) on loopback, from jars fetched with Maven.

No Docker and no Kafka tarball needed: ``stream/kafka/recipe/pom.xml`` (package data) pulls the broker from Maven Central
once into a cache, ``server.properties`` is rendered with free ports, and the pid and ports are
recorded under ``<home>/kafka/state.json`` so ``up`` is idempotent and ``down`` leaves nothing behind.
``up(keep_data=True)`` restarts the broker that ran there before as itself (same ports, same data), the way a
real broker comes back after an outage.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import signal
import socket
import string
import subprocess
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from fabwatch.export.errors import UsageError

RECIPE_DIR = Path(os.environ.get("FABWATCH_KAFKA_RECIPE", Path(__file__).resolve().parent / "recipe"))
CACHE_ROOT = Path(os.environ.get("FABWATCH_CACHE", Path.home() / ".cache" / "fabwatch"))


class BrokerSetupError(UsageError):
    """Something the broker needs is missing (Java, Maven, the repository): a one-line reason."""


@dataclass
class BrokerState:
    pid: int
    broker_port: int
    controller_port: int
    data_dir: str
    log_file: str
    started_at: float

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.broker_port}"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _pid_is_broker(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"kafka.Kafka" in cmdline


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child still answers kill(0): look at its state too
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def cluster_id() -> str:
    """A random KRaft cluster id (base64url of 16 bytes) that does not start with '-': the storage tool would
    read one that does (1 draw in 64) as an option."""
    while True:
        candidate = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not candidate.startswith("-"):
            return candidate


class LocalBroker:
    """Start, inspect and stop the local broker whose state lives under ``home``."""

    def __init__(self, home: Path | str = ".fabwatch", cache_root: Path = CACHE_ROOT, recipe_dir: Path = RECIPE_DIR):
        self.home = Path(home).resolve()
        self.dir = self.home / "kafka"
        self.state_file = self.dir / "state.json"
        self.last_start_file = self.dir / "last_start.json"  # kept by ``down``: where ``up(keep_data=True)`` restarts
        self.recipe_dir = Path(recipe_dir)
        pom = self.recipe_dir / "pom.xml"
        digest = hashlib.sha256(pom.read_bytes()).hexdigest()[:12] if pom.exists() else "missing"
        self.libs_dir = Path(cache_root) / "kafka" / digest / "libs"

    # ---- jars -----------------------------------------------------------------------------
    def ensure_jars(self) -> Path:
        """Fetch the broker's jars with Maven once; later calls reuse the cache."""
        if self.libs_dir.is_dir() and any(self.libs_dir.glob("kafka_2.13-*.jar")):
            return self.libs_dir
        pom = self.recipe_dir / "pom.xml"
        if not pom.exists():
            raise BrokerSetupError(f"broker recipe not found: {pom}")
        mvn = shutil.which("mvn")
        if mvn is None:
            raise BrokerSetupError("Maven (mvn) not found on PATH: it is needed once to fetch the Kafka broker jars")
        tmp = self.libs_dir.with_name(f"libs.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        proc = subprocess.run(
            [mvn, "-q", "-B", "-f", str(pom), "dependency:copy-dependencies", f"-DoutputDirectory={tmp}"],
            capture_output=True, text=True,
        )
        if proc.returncode != 0:
            out = proc.stdout + proc.stderr
            if any(s in out for s in ("Could not transfer", "Unknown host", "Connection refused", "Could not resolve")):
                raise BrokerSetupError("Maven could not reach its repository (Maven Central) to fetch the Kafka broker jars")
            last = next((ln for ln in reversed(out.splitlines()) if ln.strip()), "no output")
            raise BrokerSetupError(f"Maven failed to fetch the Kafka broker jars: {last.strip()[:300]}")
        self.libs_dir.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.libs_dir, ignore_errors=True)
        tmp.rename(self.libs_dir)
        return self.libs_dir

    # ---- lifecycle ------------------------------------------------------------------------
    def running_state(self) -> BrokerState | None:
        """The recorded broker if its process is still alive, else None (and a stale record is removed)."""
        try:
            state = BrokerState(**json.loads(self.state_file.read_text()))
        except (OSError, ValueError, TypeError):
            return None
        if _pid_alive(state.pid) and _pid_is_broker(state.pid):
            return state
        self.state_file.unlink(missing_ok=True)
        return None

    def up(self, timeout: float = 90.0, keep_data: bool = False) -> tuple[BrokerState, bool]:
        """Start the broker unless one is running. Returns (state, started_now).

        Each start gets fresh storage on new free ports (the local broker is for development and tests, not
        durability), unless ``keep_data``: then the broker that last ran here comes back on its ports with its
        data (topics, committed offsets, transactions), so clients reconnect as after a real broker's outage."""
        state = self.running_state()
        if state is not None:
            return state, False
        java = shutil.which("java")
        if java is None:
            raise BrokerSetupError("Java not found on PATH: the Kafka broker needs a JDK or JRE 17+")
        libs = self.ensure_jars()
        self.dir.mkdir(parents=True, exist_ok=True)
        data_dir = self.dir / "data"
        last = self._last_start() if keep_data and (data_dir / "meta.properties").exists() else None
        if last is not None:
            broker_port, controller_port = last.broker_port, last.controller_port
        else:
            shutil.rmtree(data_dir, ignore_errors=True)
            broker_port, controller_port = _free_port(), _free_port()
            while controller_port == broker_port:
                controller_port = _free_port()
        template = string.Template((self.recipe_dir / "server.properties").read_text())
        config = self.dir / "server.properties"
        config.write_text(template.substitute(broker_port=broker_port, controller_port=controller_port, log_dir=data_dir))
        log_file = self.dir / "server.log"
        jvm = [
            java, "-Xms256m", "-Xmx768m", "-XX:+UseG1GC", "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.recipe_dir / 'log4j2.properties'}",
            f"-Dfabwatch.log.file={log_file}",
            "-cp", f"{libs}/*",
        ]
        if last is None:
            fmt = subprocess.run(jvm + ["kafka.tools.StorageTool", "format", "-t", cluster_id(), "-c", str(config)],
                                 capture_output=True, text=True)
            if fmt.returncode != 0:
                raise RuntimeError(f"formatting Kafka storage failed: {(fmt.stdout + fmt.stderr).strip()[-500:]}")
        stdout = open(self.dir / "stdout.log", "ab")
        proc = subprocess.Popen(jvm + ["kafka.Kafka", str(config)], stdout=stdout, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        stdout.close()
        state = BrokerState(pid=proc.pid, broker_port=broker_port, controller_port=controller_port,
                            data_dir=str(data_dir), log_file=str(log_file), started_at=time.time())
        try:
            self._wait_ready(state, proc, timeout)
        except BaseException:
            self._stop_pid(proc.pid, 10.0)
            raise
        for record in (self.state_file, self.last_start_file):
            tmp = record.with_suffix(".tmp")
            tmp.write_text(json.dumps(asdict(state)))
            tmp.replace(record)
        return state, True

    def _last_start(self) -> BrokerState | None:
        try:
            return BrokerState(**json.loads(self.last_start_file.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def _wait_ready(self, state: BrokerState, proc: subprocess.Popen, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = Path(state.log_file).read_text(errors="replace")[-1500:] if Path(state.log_file).exists() else ""
                raise RuntimeError(f"Kafka broker exited with code {proc.returncode} during start-up; log tail:\n{tail}")
            if broker_healthy(state.bootstrap, timeout=2.0):
                return
            time.sleep(0.5)
        raise RuntimeError(f"Kafka broker did not become ready within {timeout:.0f}s (log: {state.log_file})")

    def down(self, timeout: float = 20.0) -> bool:
        """Stop the broker: SIGTERM, then SIGKILL after ``timeout``. Returns whether one was running."""
        state = self.running_state()
        if state is None:
            return False
        self._stop_pid(state.pid, timeout)
        self.state_file.unlink(missing_ok=True)
        return True

    @staticmethod
    def _stop_pid(pid: int, timeout: float) -> None:
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                try:  # reap it if it is our child, so it does not linger as a zombie
                    if os.waitpid(pid, os.WNOHANG)[0] == pid:
                        return
                except ChildProcessError:
                    pass
                if not _pid_alive(pid):
                    return
                time.sleep(0.1)

    def status(self) -> dict:
        state = self.running_state()
        if state is None:
            return {"running": False, "healthy": False, "bootstrap": None}
        return {"running": True, "healthy": broker_healthy(state.bootstrap), "bootstrap": state.bootstrap,
                "pid": state.pid, "controller_port": state.controller_port, "data_dir": state.data_dir,
                "log_file": state.log_file, "uptime_s": round(time.time() - state.started_at, 1)}


def broker_healthy(bootstrap: str, timeout: float = 5.0) -> bool:
    """True when an admin client can fetch cluster metadata with at least one broker."""
    from confluent_kafka.admin import AdminClient

    try:
        md = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0}).list_topics(timeout=timeout)
    except Exception:
        return False
    return len(md.brokers) > 0

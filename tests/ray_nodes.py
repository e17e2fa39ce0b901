"""Ray nodes for tests: a head on its own ports, and a second node that shares no disk with it.

The second node runs `ray start --address …` inside its own mount namespace (`unshare -m`, root only), with a
fresh tmpfs over every path the head and the test write (the head's temp folder, the test's work folder,
/dev/shm, the driver's cache): any hidden shared-disk assumption fails there as on two machines."""

from __future__ import annotations

import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
HEAD_PORT_NAMES = ("port", "dashboard-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                   "metrics-export-port", "runtime-env-agent-port", "node-manager-port", "object-manager-port",
                   "ray-client-server-port")
NODE_PORT_NAMES = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
                   "runtime-env-agent-port", "node-manager-port", "object-manager-port")
WORKER_PORTS = 200
#: a node under load (a test suite beside it) starts its Python agents slowly; Ray's default wait kills the raylet
SLOW_START_ENV = {"RAY_agent_register_timeout_ms": "180000"}


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def port_block(rng: random.Random, n: int) -> int:
    """First of `n` free ports in a row, below Linux's ephemeral range (so no other process is handed one by the
    kernel meanwhile) and above the session Ray's worker ports (10002-19999)."""
    while True:
        base = rng.randrange(20000, 32000 - n)
        if all(_bindable(p) for p in range(base, base + n)):
            return base


def _port_flags(names, base: int) -> list[str]:
    flags = [f"--{name}={base + i}" for i, name in enumerate(names)]
    low = base + len(names)
    return flags + [f"--min-worker-port={low}", f"--max-worker-port={low + WORKER_PORTS - 1}"]


def _wait_port(proc, port: int, seconds: float) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline and proc.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            time.sleep(1)
    return False


def start_head(env: dict, rng: random.Random, num_cpus: int, attempts: int = 3, dashboard: bool = True):
    """`ray start --head --block` on its own ports: (process, GCS port, dashboard port, temp folder) once it
    answers. A head that exits (a port taken between the check and the bind) is started again elsewhere."""
    for _ in range(attempts):
        base = port_block(rng, len(HEAD_PORT_NAMES) + WORKER_PORTS)
        temp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # AF_UNIX paths must stay short
        head = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", f"--num-cpus={num_cpus}",
                                 "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--temp-dir={temp}",
                                 f"--include-dashboard={'true' if dashboard else 'false'}",
                                 *_port_flags(HEAD_PORT_NAMES, base)],
                                env={**env, **SLOW_START_ENV}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        # the GCS answers before the head's raylet has registered: a node joining then finds no head node
        if _wait_port(head, base + (1 if dashboard else 0), 120) and _nodes_up(env, base, 1, head):
            return head, base, base + 1, Path(temp)
        stop(head)
    pytest.fail(f"ray start --head did not come up in {attempts} attempts")


def _nodes_up(env: dict, gcs_port: int, n: int, proc, seconds: float = 120) -> bool:
    """Until the cluster at `gcs_port` counts `n` live nodes (False if `proc` exits or time runs out)."""
    deadline = time.time() + seconds
    while time.time() < deadline and proc.poll() is None:
        res = subprocess.run([str(BIN / "ray"), "status", "--address", f"127.0.0.1:{gcs_port}"], env=env,
                             capture_output=True, text=True)
        if res.stdout.count(" node_") >= n:
            return True
        time.sleep(2)
    return False


def can_unshare() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True).returncode == 0


def start_private_node(env: dict, gcs_port: int, hide: list[Path], rng: random.Random, num_cpus: int = 1):
    """A second Ray node joined to the head at `gcs_port`, in its own mount namespace with a fresh tmpfs over
    each path of `hide`. Returns (process, its mount namespace) once the head counts two nodes."""
    temp = Path(tempfile.mkdtemp(prefix="rn", dir="/tmp"))
    base = port_block(rng, len(NODE_PORT_NAMES) + WORKER_PORTS)
    mounts = " && ".join(f"mkdir -p {shlex.quote(str(p))} && mount -t tmpfs tmpfs {shlex.quote(str(p))}"
                         for p in [*hide, Path("/dev/shm")])
    start = " ".join(shlex.quote(a) for a in [
        str(BIN / "ray"), "start", f"--address=127.0.0.1:{gcs_port}", "--block", f"--num-cpus={num_cpus}",
        "--node-ip-address=127.0.0.1", f"--temp-dir={temp}", *_port_flags(NODE_PORT_NAMES, base)])
    cache = env.get("IMMUNIZE_CACHE")
    prep = f" && mkdir -p {shlex.quote(cache)}" if cache else ""
    log = temp / "start.log"
    proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "bash", "-c",
                             f"{mounts}{prep} && exec {start}"], env={**env, **SLOW_START_ENV}, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    if _nodes_up(env, gcs_port, 2, proc):
        return proc, os.readlink(f"/proc/{proc.pid}/ns/mnt")
    stop(proc)
    pytest.fail(f"the second Ray node did not join the head within 2 minutes: {log.read_text()[-1500:]}")


def processes_in(namespace: str, title: str) -> list[int]:
    """PIDs whose command line starts with `title` (a Ray actor's process title) in mount namespace
    `namespace`: the processes of the node that runs there."""
    found = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            if os.readlink(p / "ns" / "mnt") == namespace and \
                    (p / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace").startswith(title):
                found.append(int(p.name))
        except OSError:
            continue
    return found


def stop(proc) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)

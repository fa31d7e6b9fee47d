"""A real multi-node Ray cluster on this machine, made of `ray start` processes.

Each node is one ``ray start --block`` process in a session of its own: the head
(GCS, dashboard with job submission, raylet) and worker nodes that join it with
``ray start --address``. Token auth is on, as Ray 2.60 does it: every process of
the cluster and every client gets ``RAY_AUTH_MODE=token`` and this cluster's own
``RAY_AUTH_TOKEN`` (a fresh random token, so ``~/.ray/auth_token`` and any other
cluster on the machine are left alone). The dashboard listens on 127.0.0.1 only
(Ray maps a node IP of 127.0.0.1 to the machine's address, so the nodes use that).

Teardown stops only what this object started: the node processes it spawned and
their descendants (raylet, GCS, agents, the worker processes the raylets forked,
job drivers), found through /proc by parent links and this cluster's marker in
their environment, each checked by start time so a reused pid is never signalled.
Never ``ray stop``: that would stop every Ray on the machine.

Usage::

    with LocalRayCluster(head_cpus=3, worker_cpus=[3]) as cluster:
        job = cluster.submit(["maskrcnn", "segment", ...], working_dir=REPO)
        info = cluster.wait_job(job, timeout=240)
        cluster.kill_raylet(cluster.workers[0])   # node loss (issue 7)
"""

from __future__ import annotations

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
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .wait import wait_until  # relative: bench/ imports this module as tests.helpers

VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")
MARKER_VAR = "MASKRCNN_TEST_CLUSTER"  # in every cluster process's environment
TERMINAL_JOB_STATES = {"SUCCEEDED", "FAILED", "STOPPED"}
# What `ray start` prints when the GCS did not answer its node in time.
GCS_TOO_SLOW = ("The current node timed out during startup", "Failed to connect to GCS")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- processes, through /proc ---------------------------------------------------------


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of ``pid``, None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the name may hold spaces and ')'
    if fields[0] == "Z":  # a zombie has finished; only its parent's wait is missing
        return None
    return int(fields[1]), int(fields[19])


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _environ_has(pid: int, entry: bytes) -> bool:
    try:
        return entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


@dataclass(frozen=True)
class Proc:
    """A process identity that survives pid reuse: pid plus start time."""

    pid: int
    started: int

    def alive(self) -> bool:
        st = _stat(self.pid)
        return st is not None and st[1] == self.started

    def signal(self, sig: int) -> None:
        if self.alive():
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass


def _descendants(roots: list[int]) -> list[Proc]:
    """``roots`` and every process below them, by parent links."""
    children: dict[int, list[int]] = {}
    stats = {}
    for pid in _all_pids():
        st = _stat(pid)
        if st is not None:
            stats[pid] = st
            children.setdefault(st[0], []).append(pid)
    found, stack = [], [r for r in roots if r in stats]
    seen = set(stack)
    while stack:
        pid = stack.pop()
        found.append(Proc(pid, stats[pid][1]))
        for c in children.get(pid, []):
            if c not in seen:
                seen.add(c)
                stack.append(c)
    return found


# --- the cluster --------------------------------------------------------------------


@dataclass
class Node:
    """One `ray start --block` process and what it started."""

    name: str
    head: bool
    num_cpus: int
    process: subprocess.Popen
    log_path: Path
    started: int = 0
    node_id: str | None = None  # hex, once the raylet is up
    killed: bool = False
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def root(self) -> Proc:
        return Proc(self.process.pid, self.started)

    def processes(self) -> list[Proc]:
        """This node's live processes: its `ray start` and what it started (raylet,
        agents, on the head GCS and dashboard; worker processes the raylet forked)."""
        if self.process.poll() is not None:
            return []
        return [p for p in _descendants([self.process.pid]) if p.alive()]

    def raylet(self) -> Proc | None:
        for proc in _descendants([self.process.pid]):
            argv = _cmdline(proc.pid)
            if argv and Path(argv[0]).name == "raylet":
                return proc
        return None


class ClusterError(RuntimeError):
    pass


class LocalRayCluster:
    """A head node and ``len(worker_cpus)`` worker nodes on this machine (see module doc)."""

    def __init__(
        self,
        head_cpus: int = 2,
        worker_cpus: list[int] | tuple[int, ...] = (2,),
        object_store_mb: int = 300,
        env: dict[str, str] | None = None,
        start_timeout: float = 120.0,
    ):
        self.head_cpus = head_cpus
        self.worker_cpus = list(worker_cpus)
        self.object_store_bytes = object_store_mb * 1024 * 1024
        self.start_timeout = start_timeout
        self.token = secrets.token_hex(32)
        # Short: Unix socket paths under it must stay below 108 bytes.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        marker = f"{self.temp_dir}"
        self.env = {
            **os.environ,
            **(env or {}),
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            MARKER_VAR: marker,
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        # A client of this cluster must not reach another one.
        self.env.pop("RAY_ADDRESS", None)
        self._marker_entry = f"{MARKER_VAR}={marker}".encode()
        self.head: Node | None = None
        self.workers: list[Node] = []
        self._stopped = False

    # -- lifecycle --

    def __enter__(self) -> LocalRayCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self.head = self._spawn("head", self.head_cpus, head=True)
        self._wait(lambda: self._dashboard_ready(), "the head's dashboard", [self.head])
        self._wait(lambda: len(self.alive_nodes()) >= 1, "the head's raylet", [self.head])
        self._node_id(self.head)
        for cpus in self.worker_cpus:
            self.add_node(cpus)

    def add_node(self, num_cpus: int) -> Node:
        """Start one more worker node and wait until the GCS counts it alive.

        `ray start` gives a node a fixed 30 s to register with the GCS (ray/_private/node.py)
        and exits when the GCS has not answered; on a loaded 2-core machine it can take
        longer. Such a node is started once more, as a person would; any other exit fails
        at once."""
        for attempt in (1, 2):
            node = self._spawn(f"worker{len(self.workers) + 1}", num_cpus, head=False)
            self.workers.append(node)
            try:
                self._wait(lambda n=node: self._registered(n), f"{node.name} to join", [node])
                return node
            except pytest.fail.Exception:
                if attempt == 2 or not any(m in self.log_tail(node) for m in GCS_TOO_SLOW):
                    raise
                node.killed = True  # its processes died with its `ray start` (fate sharing)
        raise AssertionError("unreachable")

    def _registered(self, node: Node) -> bool:
        """Whether ``node``'s own raylet is up and the GCS counts it alive."""
        try:
            node_id = self._node_id(node)
        except ClusterError:
            return False
        return any(n["node_id"] == node_id for n in self.alive_nodes())

    def _spawn(self, name: str, num_cpus: int, head: bool) -> Node:
        ports = {
            "dashboard-agent-listen-port": free_port(),
            "dashboard-agent-grpc-port": free_port(),
            "metrics-export-port": free_port(),
            "runtime-env-agent-port": free_port(),
        }
        # A temp dir per node, as on separate machines: nodes that share one also share the
        # unpacked working_dir, and a joining node's runtime-env agent deletes and unpacks it
        # again while the head's driver is importing from it (a missing-module flake).
        node_dir = self.temp_dir if head else self.temp_dir / name
        node_dir.mkdir(exist_ok=True)
        argv = [
            RAY,
            "start",
            "--block",
            f"--num-cpus={num_cpus}",
            "--num-gpus=0",
            f"--object-store-memory={self.object_store_bytes}",
            f"--temp-dir={node_dir}",
            "--disable-usage-stats",
            *(f"--{k}={v}" for k, v in ports.items()),
        ]
        if head:
            ports["ray-client-server-port"] = free_port()
            argv += [
                "--head",
                f"--port={self.gcs_port}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={ports['ray-client-server-port']}",
            ]
        else:
            argv.append(f"--address={self.address}")
        log_path = self.temp_dir / f"{name}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                argv,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # our own process group: nothing else shares it
                cwd=self.temp_dir,
            )
        st = _stat(process.pid)
        node = Node(name, head, num_cpus, process, log_path, st[1] if st else 0, ports=ports)
        return node

    def _wait(self, ready, what: str, nodes: list[Node], timeout: float | None = None) -> None:
        def answers() -> bool:
            try:
                return bool(ready())
            except (OSError, ValueError):
                return False

        def exited() -> str | None:
            for node in nodes:
                if node.process.poll() is not None:
                    return f"{node.name} exited with {node.process.returncode}"
            return None

        tails = lambda: "\n".join(self.log_tail(n) for n in nodes)  # noqa: E731
        wait_until(answers, what, timeout or self.start_timeout, 0.5, exited, tails)

    def log_tail(self, node: Node, lines: int = 40) -> str:
        try:
            text = node.log_path.read_text(errors="replace")
        except OSError:
            return f"({node.name}: no log)"
        return f"--- {node.name} ({node.log_path}) ---\n" + "\n".join(text.splitlines()[-lines:])

    # -- the dashboard's HTTP API (what `ray job` and the state API use) --

    def http(self, path: str, data: dict | None = None, timeout: float = 10.0):
        """JSON from the dashboard, with this cluster's token."""
        req = urllib.request.Request(
            self.dashboard_url + path,
            data=None if data is None else json.dumps(data).encode(),
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read().decode() or "null")

    def _dashboard_ready(self) -> bool:
        try:
            return bool(self.http("/api/version", timeout=3))
        except urllib.error.URLError:
            return False

    def nodes(self) -> list[dict]:
        """Every node the GCS knows, alive or dead (state API rows: node_id, state, ...)."""
        reply = self.http("/api/v0/nodes?limit=1000&detail=1")
        return reply["data"]["result"]["result"]

    def alive_nodes(self) -> list[dict]:
        return [n for n in self.nodes() if n["state"] == "ALIVE"]

    def actors(self, class_name: str | None = None) -> list[dict]:
        """State API rows of actors, alive and dead (class_name, state, node_id, pid, ...)."""
        reply = self.http("/api/v0/actors?limit=10000&detail=1")
        rows = reply["data"]["result"]["result"]
        return [a for a in rows if class_name is None or class_name in a["class_name"]]

    def _node_id(self, node: Node) -> str:
        """The node's hex id, from its raylet's command line."""
        if node.node_id is None:
            raylet = node.raylet()
            for arg in _cmdline(raylet.pid) if raylet else []:
                if arg.startswith("--node_id="):
                    node.node_id = arg.split("=", 1)[1]
        if node.node_id is None:
            raise ClusterError(f"no raylet found under {node.name}")
        return node.node_id

    # -- jobs --

    def ray_cli(self, *args: str, timeout: float = 120, check: bool = True, cwd=None):
        """Run ``ray ARGS`` as a client of this cluster (token in its environment)."""
        result = subprocess.run(
            [RAY, *args],
            env=self.env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise ClusterError(
                f"ray {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
            )
        return result

    def submit(
        self,
        entrypoint: list[str],
        working_dir: str | Path | None = None,
        submission_id: str | None = None,
        runtime_env: dict | None = None,
    ) -> str:
        """`ray job submit --no-wait [--working-dir DIR] -- ENTRYPOINT`; returns the job id."""
        job_id = submission_id or f"job-{secrets.token_hex(4)}"
        args = ["job", "submit", "--address", self.dashboard_url, "--no-wait"]
        args += ["--submission-id", job_id]
        if working_dir is not None:
            args += ["--working-dir", str(working_dir)]
        if runtime_env is not None:
            args += ["--runtime-env-json", json.dumps(runtime_env)]
        self.ray_cli(*args, "--", *entrypoint, cwd=working_dir)
        return job_id

    def job(self, job_id: str) -> dict:
        return self.http(f"/api/jobs/{job_id}")

    def job_logs(self, job_id: str) -> str:
        return self.http(f"/api/jobs/{job_id}/logs")["logs"]

    def wait_job(self, job_id: str, timeout: float) -> dict:
        """Poll the job until it ends; returns its info (``status``, ``message``, ...)."""
        info = self.job(job_id)

        def ended() -> bool:
            info.update(self.job(job_id))
            return info["status"] in TERMINAL_JOB_STATES

        def log_tail() -> str:
            return f"still {info['status']}; log tail:\n" + "\n".join(
                self.job_logs(job_id).splitlines()[-40:]
            )

        wait_until(ended, f"job {job_id} to end", timeout, 1.0, context=log_tail)
        return info

    # -- faults (issue 7) --

    def kill_raylet(self, node: Node, wait_dead: float = 60.0) -> None:
        """SIGKILL ``node``'s raylet (its `ray start --block` then stops the rest of the
        node) and wait until the GCS reports the node dead. The node is lost for good."""
        if node.head:
            raise ValueError("kill_raylet takes a worker node; losing the head ends the cluster")
        node_id = self._node_id(node)
        raylet = node.raylet()
        if raylet is None:
            raise ClusterError(f"{node.name} has no raylet running")
        raylet.signal(signal.SIGKILL)
        node.killed = True
        self._wait_dead(node_id, f"the GCS to mark {node.name} dead", wait_dead)

    def remove_node(self, node: Node, timeout: float = 60.0) -> None:
        """Stop worker node ``node`` as an autoscaler scales one down (SIGTERM to its `ray
        start --block`, which stops the node's processes) and wait until the GCS counts
        it dead. A node already lost is left as it is."""
        if node.head:
            raise ValueError("remove_node takes a worker node; stop() ends the cluster")
        if node.killed:
            return
        node_id = self._node_id(node)
        node.process.send_signal(signal.SIGTERM)
        node.killed = True
        self._wait_dead(node_id, f"the GCS to count {node.name} removed", timeout)

    def _wait_dead(self, node_id: str, what: str, timeout: float) -> None:
        """Until the GCS reports node ``node_id`` DEAD (``what`` names the wait)."""

        def dead() -> bool:
            states = {n["node_id"]: n["state"] for n in self.nodes()}
            return states.get(node_id) == "DEAD"

        self._wait(dead, what, [self.head], timeout)

    # -- teardown --

    def processes(self) -> list[Proc]:
        """Every live process of this cluster: descendants of the nodes this object
        started, plus any process carrying this cluster's marker (a worker re-parented
        after its raylet died)."""
        nodes = ([self.head] if self.head else []) + self.workers
        # A root is our child: its pid cannot be reused before we reap it (poll()).
        roots = [n.process.pid for n in nodes if n.process.poll() is None]
        procs = {p.pid: p for p in _descendants(roots)}
        for pid in _all_pids():
            if pid not in procs and pid != os.getpid() and _environ_has(pid, self._marker_entry):
                st = _stat(pid)
                if st is not None:
                    procs[pid] = Proc(pid, st[1])
        return [p for p in procs.values() if p.alive()]

    def stop(self, grace: float = 5.0) -> None:
        """Stop this cluster's processes, and only them; raise if any survives.

        ``grace``: how long SIGTERM'd nodes get before SIGKILL. Worker nodes exit in about
        a second; after a job ran, the head's `ray start --block` can wait on for more than
        30 s, and nothing in it is worth waiting for: its processes are killed, then checked."""
        if self._stopped:
            return
        self._stopped = True
        nodes = [*reversed(self.workers), *([self.head] if self.head else [])]
        # Ask each `ray start --block` to stop its node (workers first), then make sure.
        for node in nodes:
            if node.process.poll() is None:
                node.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(n.process.poll() is None for n in nodes):
            time.sleep(0.2)
        for _ in range(3):
            left = self.processes()
            if not left:
                break
            for proc in left:
                proc.signal(signal.SIGKILL)
            end = time.monotonic() + 10
            while time.monotonic() < end and any(p.alive() for p in left):
                time.sleep(0.1)
        for node in nodes:
            try:
                node.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        left = self.processes()
        if left:
            raise ClusterError(f"processes of this cluster still alive: {left}")
        shutil.rmtree(self.temp_dir, ignore_errors=True)

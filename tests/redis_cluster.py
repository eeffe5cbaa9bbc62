"""A real Redis Cluster on loopback free ports, owned by the test that started it:
N primaries (and optionally a replica each), created with ``redis-cli --cluster
create``, with nodes that can be killed and started again from their own
cluster config file."""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from tests.redis_proc import require_binary

# Long enough that a loaded two-core machine does not look like a failed node.
NODE_TIMEOUT_MS = 3000


def cluster_port() -> int:
    """A free port whose cluster bus port (10000 higher, so at most 65535) is free too."""
    for _ in range(200):
        port = random.randint(20000, 55535)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        return port
    raise RuntimeError("no free pair of ports for a cluster node")


class ClusterNode:
    def __init__(self, binary: str, root: Path) -> None:
        self.binary = binary
        self.port = cluster_port()
        self.dir = root / str(self.port)
        self.dir.mkdir()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def name(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        # The same config file every time: a restarted node rejoins as itself.
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--dir", str(self.dir),
                "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
                # The other shards go on serving while one is down.
                "--cluster-require-full-coverage", "no",
                # History survives a kill -9 (what was acknowledged is in the file).
                "--appendonly", "yes",
                "--save", "",
                "--loglevel", "warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if self.command("PING"):
                    return
            except (redis.RedisError, OSError):
                time.sleep(0.05)
        raise RuntimeError(f"cluster node {self.name} did not start")

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)

    def command(self, *args: str) -> object:
        client = self.client()
        try:
            return client.execute_command(*args)
        finally:
            client.close()

    def cluster_info(self) -> dict[str, str]:
        client = self.client()
        try:
            info: dict[str, str] = client.cluster("info")
            return info
        finally:
            client.close()

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class RedisClusterProcesses:
    def __init__(self, primaries: int = 3, replicas: int = 0) -> None:
        self.binary = require_binary("redis-server")
        self.cli = require_binary("redis-cli")
        self.root = Path(tempfile.mkdtemp(prefix="bomstream-cluster-"))
        self.replicas = replicas
        self.nodes = [
            ClusterNode(self.binary, self.root) for _ in range(primaries * (1 + replicas))
        ]

    @property
    def url(self) -> str:
        """Any one node: the gateway and the publishers discover the rest."""
        return f"redis://127.0.0.1:{self.nodes[0].port}/0"

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        subprocess.run(
            [self.cli, "--cluster", "create", *(n.name for n in self.nodes),
             "--cluster-replicas", str(self.replicas), "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )  # fmt: skip
        self.wait_ok()

    def wait_ok(self, timeout: float = 30) -> None:
        """Until every running node says the cluster is ok, all slots are served
        and they agree on who serves them."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                views = []
                for node in self.nodes:
                    if not node.running:
                        continue
                    info = node.cluster_info()
                    views.append(self._slot_owners(node))
                    if info["cluster_state"] != "ok" or int(info["cluster_slots_ok"]) != 16384:
                        raise RuntimeError(f"{node.name}: {info['cluster_state']}")
                if views and all(v == views[0] for v in views):
                    return
                last = "nodes disagree on slot owners"
            except (redis.RedisError, OSError, RuntimeError) as exc:
                last = str(exc)
            time.sleep(0.1)
        raise RuntimeError(f"cluster not ok after {timeout}s: {last}")

    @staticmethod
    def _slot_owners(node: ClusterNode) -> list[tuple[int, int, int]]:
        slots = node.command("CLUSTER", "SLOTS")
        assert isinstance(slots, list)
        return sorted((int(s[0]), int(s[1]), int(s[2][1])) for s in slots)

    def slot(self, key: str) -> int:
        node = next(n for n in self.nodes if n.running)
        value = node.command("CLUSTER", "KEYSLOT", key)
        assert isinstance(value, int)
        return value

    def owner(self, key: str) -> ClusterNode:
        """The primary serving the key's (or shard channel's) slot."""
        slot = self.slot(key)
        node = next(n for n in self.nodes if n.running)
        for start, end, port in self._slot_owners(node):
            if start <= slot <= end:
                return next(n for n in self.nodes if n.port == port)
        raise AssertionError(f"slot {slot} is not served")

    def replica_of(self, primary: ClusterNode) -> ClusterNode:
        node_id = str(primary.command("CLUSTER", "MYID"))
        if isinstance(node_id, bytes):
            node_id = node_id.decode()
        for node in self.nodes:
            if node is primary or not node.running:
                continue
            role = node.command("ROLE")
            assert isinstance(role, list)
            if role[0] in (b"slave", "slave") and int(role[2]) == primary.port:
                return node
        raise AssertionError(f"{primary.name} ({node_id}) has no replica")

    def keys_on(self, node: ClusterNode, pattern: str) -> list[str]:
        client = node.client()
        try:
            return sorted(k.decode() for k in client.scan_iter(match=pattern))
        finally:
            client.close()

    def close(self) -> None:
        for node in self.nodes:
            node.kill()
        shutil.rmtree(self.root, ignore_errors=True)

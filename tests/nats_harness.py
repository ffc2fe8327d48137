"""Real nats-server (Debian's package) for the tests: one JetStream node, or a three-node
JetStream cluster, on loopback, each node a process the test can kill -9 and start again."""

from __future__ import annotations

import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from appliance.up import free_port

NATS_SERVER = "/usr/sbin/nats-server"


@dataclass
class Node:
    name: str
    port: int
    monitor: int
    config: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen([NATS_SERVER, "-c", str(self.config)],
                                            stdout=out, stderr=subprocess.STDOUT)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.monitor}/healthz",
                                        timeout=2) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False


@dataclass
class Cluster:
    nodes: list[Node] = field(default_factory=list)

    @property
    def urls(self) -> str:
        return ",".join(f"nats://127.0.0.1:{n.port}" for n in self.nodes)

    def wait_healthy(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not all(n.healthy() for n in self.nodes if n.process is not None and
                      n.process.poll() is None):
            if time.monotonic() > deadline:
                logs = {n.name: n.log.read_text()[-1500:] for n in self.nodes}
                raise AssertionError(f"nats-server not healthy: {logs}")
            time.sleep(0.1)


@contextmanager
def nats_servers(folder: Path, count: int = 1) -> Iterator[Cluster]:
    """`count` JetStream nodes (3: one cluster), started and healthy; killed after."""
    folder.mkdir(parents=True, exist_ok=True)
    cluster_ports = [free_port() for _ in range(count)]
    cluster = Cluster()
    for i in range(count):
        name = f"n{i + 1}"
        node = Node(name, free_port(), free_port(), folder / f"{name}.conf",
                    folder / f"{name}.log")
        text = (f'server_name: {name}\nlisten: "127.0.0.1:{node.port}"\n'
                f'http: "127.0.0.1:{node.monitor}"\n'
                f'jetstream {{ store_dir: "{folder / name}" }}\n')
        if count > 1:
            routes = ", ".join(f'"nats-route://127.0.0.1:{p}"' for j, p in
                               enumerate(cluster_ports) if j != i)
            text += (f'cluster {{ name: "adpop", listen: "127.0.0.1:{cluster_ports[i]}", '
                     f'routes: [{routes}] }}\n')
        node.config.write_text(text)
        cluster.nodes.append(node)
    try:
        for node in cluster.nodes:
            node.start()
        cluster.wait_healthy()
        yield cluster
    finally:
        for node in cluster.nodes:
            node.kill()

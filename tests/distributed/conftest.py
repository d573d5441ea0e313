"""Shared fixtures for the ``torch.distributed`` tests: real ``torchrun`` (``python -m torch.distributed.run``)
subprocesses on gloo and the CPU, whose ranks write their results to files the tests read."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).parent
WORKER = HERE / "loop_worker.py"

Torchrun = Callable[..., list[dict[str, Any]]]


def torchrun_env(extra_path: Sequence[str] = ()) -> dict[str, str]:
    """This environment without weavelet or torch.distributed settings, with this process's import path."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("WEAVELET_", "LOCAL_RANK", "NODE_RANK", "MASTER_", "TORCHELASTIC_"))
        and k not in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK")
    }
    env["PYTHONPATH"] = os.pathsep.join([*extra_path, *sys.path[1:], env.get("PYTHONPATH", "")]).strip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    return env


def read_ranks(out: Path, world: int) -> list[dict[str, Any]]:
    """Every rank's ``rank<N>.json`` from ``out``, in rank order."""
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def torchrun() -> Torchrun:
    """``torchrun(script, *args, out=DIR, nproc=2, timeout=180)``: run ``script`` on ``nproc`` local ranks with
    ``python -m torch.distributed.run --standalone`` (a c10d rendezvous on a free port), fail with its output when
    it exits non-zero, and return what each rank wrote to ``DIR/rank<N>.json``."""

    def run(script: Path, *args: str, out: Path, nproc: int = 2, timeout: float = 180) -> list[dict[str, Any]]:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        done = subprocess.run(
            [*command, str(script), *args],
            env=torchrun_env(),
            cwd=out,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        assert done.returncode == 0, f"torchrun exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
        return read_ranks(out, nproc)

    return run


# ----------------------------------------------------------------------------- two nodes in network namespaces


class TwoNodes:
    """Two network namespaces standing for two machines, and a broker link from each to the root namespace.

    * ``node`` link: a veth pair between the namespaces, ``10.213.N.1`` (node 0) and ``10.213.N.2`` (node 1);
      torch's rendezvous and gloo run over it.
    * ``broker`` link: a bridge in the root namespace at :attr:`broker_ip` (``10.214.N.1``) with one veth to each
      namespace (``.2`` and ``.3``); a server bound to :attr:`broker_ip` is reachable from both nodes and from the
      root namespace. :meth:`cut_broker` sets the bridge down: the nodes lose the broker, not each other.
    """

    def __init__(self) -> None:
        token = secrets.token_hex(3)
        self.tag = token
        self.subnet = 16 + secrets.randbelow(200)
        self.namespaces = (f"wlt-{token}-0", f"wlt-{token}-1")
        self.node_ifaces = (f"wl{token}n0", f"wl{token}n1")
        self.bridge = f"wl{token}br"
        self.node_ips = (f"10.213.{self.subnet}.1", f"10.213.{self.subnet}.2")
        self.broker_ip = f"10.214.{self.subnet}.1"
        self._made: list[list[str]] = []  # undo commands, run in reverse

    def _ip(self, *args: str) -> None:
        done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)} failed: {done.stderr.strip()}")

    def create(self) -> None:
        for ns in self.namespaces:
            self._ip("netns", "add", ns)
            self._made.append(["netns", "del", ns])
            self._ip("-n", ns, "link", "set", "lo", "up")
        a, b = self.namespaces
        peer = ("peer", "name", self.node_ifaces[1], "netns", b)
        self._ip("link", "add", self.node_ifaces[0], "netns", a, "type", "veth", *peer)
        for ns, iface, ip in zip(self.namespaces, self.node_ifaces, self.node_ips, strict=True):
            self._ip("-n", ns, "addr", "add", f"{ip}/24", "dev", iface)
            self._ip("-n", ns, "link", "set", iface, "up")
        self._ip("link", "add", self.bridge, "type", "bridge")
        self._made.append(["link", "del", self.bridge])
        self._ip("addr", "add", f"{self.broker_ip}/24", "dev", self.bridge)
        self._ip("link", "set", self.bridge, "up")
        for index, ns in enumerate(self.namespaces):
            outside, inside = f"wl{self.tag}b{index}", f"wl{self.tag}m{index}"
            self._ip("link", "add", outside, "type", "veth", "peer", "name", inside, "netns", ns)
            self._made.append(["link", "del", outside])
            self._ip("link", "set", outside, "master", self.bridge, "up")
            self._ip("-n", ns, "addr", "add", f"10.214.{self.subnet}.{index + 2}/24", "dev", inside)
            self._ip("-n", ns, "link", "set", inside, "up")

    def cut_broker(self) -> None:
        """Cut both nodes off the broker (the torch link between the nodes stays up)."""
        self._ip("link", "set", self.bridge, "down")

    def restore_broker(self) -> None:
        self._ip("link", "set", self.bridge, "up")

    def remove(self) -> None:
        """Delete everything :meth:`create` made (also after a partial create); never raises."""
        while self._made:
            undo = self._made.pop()
            subprocess.run(["ip", *undo], capture_output=True, timeout=10, check=False)

    def leftovers(self) -> list[str]:
        """Names of this object's namespaces and links that still exist (empty after :meth:`remove`)."""
        names = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, timeout=10).stdout
        spaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
        return [n for n in (*self.namespaces, self.bridge) if n in names or n in spaces]


@pytest.fixture
def two_nodes() -> Iterator[TwoNodes]:
    """:class:`TwoNodes`, created for the test and removed on every way out of it (unique names per test).

    Skips, with the reason, only where network namespaces cannot be created here (no ``ip`` command, or no
    ``CAP_NET_ADMIN``)."""
    skip_without_namespaces()
    nodes = TwoNodes()
    try:
        nodes.create()
        yield nodes
    finally:
        nodes.remove()


def skip_without_namespaces() -> None:
    """Skip the test, saying why, where network namespaces cannot be created."""
    if shutil.which("ip") is None:
        pytest.skip("the 'ip' command (iproute2) is not installed: two network namespaces cannot be made")
    name = f"wlt-{secrets.token_hex(3)}-probe"
    done = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True, timeout=10, check=False)
    if done.returncode != 0:
        pytest.skip(
            f"network namespaces cannot be created here (ip netns add: {done.stderr.strip()}); run as root or "
            "with CAP_NET_ADMIN"
        )
    subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10, check=False)

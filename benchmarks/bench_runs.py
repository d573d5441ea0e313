"""``weavelet runs`` at scale: listing N runs (default 10,000) on every transport, beside two baselines.

Every run has one revision and one status. Measured in the same run, each on a fresh connection (as a
``weavelet runs`` command makes one), the best of ``--repeat`` tries (interleaved; on a shared machine the
slower tries measure the other jobs, the best one what the code costs):

- before: what ``weavelet runs`` did before the transports had batched reads of their own: ``runs()``, then the
  base class's ``latests``/``statuses``, which call ``latest(run)`` and ``status(run)`` for every run (64 at a
  time), and a row per run;
- raw: the store's own client reading the same data, decoding nothing: for NATS nats-py's ``watchall()`` over
  both buckets, for Redis a redis-py pipeline of ``SMEMBERS``, ``HGET`` and ``XREVRANGE ... COUNT 1``, for files
  a directory listing and a read of each run's two files (none for memory);
- batched: what ``weavelet runs`` does now (:func:`weavelet_core.cli.read.overview`): ``runs()``, then the
  transport's ``latests(runs)`` and ``statuses(runs)``, each run decoded and checked, one row per run;
- command: the whole ``weavelet runs`` command in a new process (interpreter start-up, imports, the listing,
  the 10,000-row table written to ``/dev/null``); none for memory, which lives in one process.

Two kinds of status are measured: ``minimal`` (state and step, about 300 bytes) and ``trainer`` (what a Lightning
trainer publishes: its optimizer, metrics, last outcome, labels, and the schema of what it accepts, which
``weavelet set`` checks a change against). Each is published as a trainer's sidecar publishes it
(:class:`weavelet_core.statuses.StatusPublisher`): on the built-in transports the 4 KB schema is stored apart, and
the status that names it by digest is about 600 bytes.

Target: the batched listing of 10,000 runs within 1 s on every transport. Usage:
``python benchmarks/bench_runs.py [--runs N] [--repeat K] [--statuses minimal,trainer]
[--transports memory,file,redis,nats]``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import anyio

from weavelet_core import AsyncWeaver, Revision, Status, open_transport
from weavelet_core.cli.read import overview, row_of
from weavelet_core.statuses import StatusPublisher
from weavelet_core.transport import Transport

TARGET_S = 1.0
RAW_TIMEOUT = 60.0
"""Seconds a raw read of the whole store may take before the benchmark gives up on it."""


@contextmanager
def memory_url() -> Iterator[str]:
    yield f"memory://bench-runs-{uuid.uuid4().hex[:8]}"


@contextmanager
def file_url() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="bench-runs-") as directory:
        yield Path(directory).as_uri()


@contextmanager
def redis_url() -> Iterator[str]:
    from weavelet_redis.testing import RedisServer

    with tempfile.TemporaryDirectory(prefix="bench-runs-redis-") as directory:
        server = RedisServer(Path(directory)).start()
        try:
            yield server.url
        finally:
            server.stop()


@contextmanager
def nats_url() -> Iterator[str]:
    from weavelet_nats.embedded import NatsServer

    with tempfile.TemporaryDirectory(prefix="bench-runs-nats-") as store, NatsServer(store) as server:
        yield server.url


STORES: dict[str, Callable[[], AbstractContextManager[str]]] = {
    "memory": memory_url,
    "file": file_url,
    "redis": redis_url,
    "nats": nats_url,
}


OPTIMIZER_KEYS = {
    "adadelta": "eps lr maximize rho weight_decay",
    "adafactor": "beta2_decay d eps lr maximize weight_decay",
    "adagrad": "eps initial_accumulator_value lr lr_decay maximize weight_decay",
    "adam": "amsgrad betas decoupled_weight_decay eps lr maximize weight_decay",
    "adamax": "betas eps lr maximize weight_decay",
    "adamw": "amsgrad betas eps lr maximize weight_decay",
    "asgd": "alpha lambd lr maximize t0 weight_decay",
    "muon": "adjust_lr_fn eps lr momentum nesterov ns_coefficients ns_steps weight_decay",
    "nadam": "betas decoupled_weight_decay eps lr maximize momentum_decay weight_decay",
    "radam": "betas decoupled_weight_decay eps lr maximize weight_decay",
    "rmsprop": "alpha centered eps lr maximize momentum weight_decay",
    "rprop": "etas lr maximize step_sizes",
    "sgd": "dampening lr maximize momentum nesterov weight_decay",
}
"""The torch optimizers and their keys, as a trainer's schema lists them (torch 2.13)."""


def _kind(key: str) -> dict[str, object]:
    if key in ("amsgrad", "maximize", "nesterov", "centered", "decoupled_weight_decay"):
        return {"kind": "bool"}
    if key in ("betas", "etas", "step_sizes"):
        return {"kind": "betas", "length": 2}
    return {"kind": "float", "min": 0}


def trainer_status(run: str, index: int) -> Status:
    """A status shaped and sized like a Lightning trainer's (about 4 KB, most of it the schema)."""
    types = {name: {"keys": {key: _kind(key) for key in keys.split()}} for name, keys in OPTIMIZER_KEYS.items()}
    schema = {
        "version": 1,
        "nested": False,
        "optimizers": [
            {"name": None, "type": "adam", "param_groups": 1, "keys": types["adam"]["keys"], "group_keys": [],
             "swap": None}
        ],
        "types": types,
        "unsupported": {"lbfgs": "it needs a closure", "sparseadam": "it needs sparse gradients"},
        "flags": ["capturable", "differentiable", "foreach", "fused"],
        "handlers": [],
        "commands": ["stop", "checkpoint"],
        "allow": None,
    }  # fmt: skip
    return Status(
        run=run,
        state="running",
        step=index,
        epoch=index // 1000,
        applied_revision=1,
        optimizer={"name": "adam", "lr": 0.001, "betas": [0.9, 0.999], "eps": 1e-08, "weight_decay": 0},
        metrics={"loss": 0.25, "val_loss": 0.31},
        incarnation="a98809c07f11",
        started_at=time.time() - 3600,
        keepalive=5.0,
        last_outcome={"revision": 1, "revision_id": uuid.uuid4().hex, "result": "applied", "step": 0},
        labels={"sweep": str(index % 7)},
        schema=schema,
    )


STATUSES: dict[str, Callable[[str, int], Status]] = {
    "minimal": lambda run, index: Status(run=run, state="running", step=index),
    "trainer": trainer_status,
}


async def populate(transport: Transport, count: int, kind: str = "minimal") -> None:
    semaphore = anyio.Semaphore(64)
    status_of = STATUSES[kind]

    async def one(index: int) -> None:
        run = f"run-{index:05d}"
        async with semaphore:
            await transport.put(Revision(run=run, revision=1, config={"lr": 0.1}))
            await StatusPublisher().publish(transport, status_of(run, index))  # as a trainer's sidecar does

    async with anyio.create_task_group() as tg:
        for index in range(count):
            tg.start_soon(one, index)


async def before(transport: Transport) -> int:
    runs = await transport.runs()
    latest = await Transport.latests(transport, runs)  # the base class's reads, run by run
    statuses = await Transport.statuses(transport, runs)
    now = time.time()
    return len([row_of(run, latest[run], statuses[run], None, now) for run in runs])


async def batched(weaver: AsyncWeaver) -> int:
    return len(await overview(weaver, await weaver.runs(), None))


# -- the stores' own clients, decoding nothing ----------------------------------------------------------------


async def raw_file(url: str, count: int) -> int:
    from weavelet_file.transport import path_from_url

    def read() -> int:
        runs = path_from_url(url) / "runs"
        count = 0
        for name in os.listdir(runs):
            for file in ("latest.json", "status.json"):
                with open(runs / name / file, "rb") as f:
                    f.read()
            count += 1
        return count

    return await anyio.to_thread.run_sync(read)


async def raw_redis(url: str, count: int) -> int:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    try:
        runs = [m.decode() for m in await client.smembers("weavelet:runs")]
        count = 0
        for start in range(0, len(runs), 1000):
            pipe = client.pipeline(transaction=False)
            for run in runs[start : start + 1000]:
                pipe.hget(f"weavelet:run:{{{run}}}", "status")
                pipe.xrevrange(f"weavelet:run:{{{run}}}:revisions", count=1)
            replies = await pipe.execute()
            count += sum(1 for reply in replies[::2] if reply is not None)
        return count
    finally:
        await client.aclose()


async def raw_nats(url: str, count: int) -> int:
    import nats

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        counts = []
        for bucket in ("weavelet-desired", "weavelet-status"):
            kv = await js.key_value(bucket)
            watcher = await kv.watchall()
            keys: set[str] = set()
            with anyio.fail_after(RAW_TIMEOUT):
                while len(keys) < count:  # its end-of-values marker can come early (nats.py #995): count keys
                    entry = await watcher.updates(timeout=RAW_TIMEOUT)  # type: ignore[no-untyped-call]
                    if entry is not None:
                        keys.add(entry.key)
            await watcher.stop()  # type: ignore[no-untyped-call]
            counts.append(len(keys))
        return min(counts)
    finally:
        await nc.close()


RAW: dict[str, Callable[[str, int], Awaitable[int]]] = {"file": raw_file, "redis": raw_redis, "nats": raw_nats}


# -- measuring ------------------------------------------------------------------------------------------------


async def timed(read: Callable[[], Awaitable[int]], count: int) -> float:
    started = time.perf_counter()
    got = await read()
    took = time.perf_counter() - started
    assert got == count, f"read {got} runs, expected {count}"
    return took


async def fill(url: str, count: int, kind: str) -> None:
    async with open_transport(url) as transport:
        await populate(transport, count, kind)


async def measure_batched(url: str, count: int) -> float:
    async with open_transport(url) as transport, AsyncWeaver(transport=transport) as weaver:
        return await timed(lambda: batched(weaver), count)


async def measure_before(url: str, count: int) -> float:
    async with open_transport(url) as transport:
        return await timed(lambda: before(transport), count)


async def measure_raw(raw: Callable[[str, int], Awaitable[int]], url: str, count: int) -> float:
    return await timed(lambda: raw(url, count), count)


def measure_command(url: str, count: int) -> float:
    started = time.perf_counter()
    with open(os.devnull, "w") as sink:
        done = subprocess.run(
            [sys.executable, "-m", "weavelet_core", "runs", "--url", url],
            stdout=sink, stderr=subprocess.PIPE, text=True, timeout=120, check=False,
        )  # fmt: skip
    took = time.perf_counter() - started
    assert done.returncode == 0, done.stderr
    return took


def run_store(name: str, url: str, count: int, repeat: int, kind: str) -> dict[str, float | None]:
    anyio.run(fill, url, count, kind, backend="asyncio")
    figures: dict[str, list[float]] = {"before": [], "raw": [], "batched": [], "command": []}
    for _ in range(repeat):  # interleaved, so that a noisy moment touches every figure alike
        figures["batched"].append(anyio.run(measure_batched, url, count, backend="asyncio"))
        figures["before"].append(anyio.run(measure_before, url, count, backend="asyncio"))
        if name in RAW:
            figures["raw"].append(anyio.run(measure_raw, RAW[name], url, count, backend="asyncio"))
        if name != "memory":
            figures["command"].append(measure_command(url, count))
    return {key: min(values) if values else None for key, values in figures.items()}


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} s"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5, help="tries of each figure; the best is shown")
    parser.add_argument("--statuses", default=",".join(STATUSES), help="minimal, trainer or both")
    parser.add_argument("--transports", default=",".join(STORES))
    args = parser.parse_args(argv)
    failed = False
    for kind in args.statuses.split(","):
        print(
            f"\nlisting {args.runs:,} runs (a revision and a {kind} status each), best of {args.repeat}; "
            f"target: batched <= {TARGET_S:g} s"
        )
        header = ("TRANSPORT", "BEFORE (run by run)", "RAW CLIENT", "BATCHED (now)", "VS RAW", "COMMAND", "TARGET")
        print(
            f"{header[0]:10} {header[1]:>20} {header[2]:>11} {header[3]:>14} {header[4]:>7} {header[5]:>9}  {header[6]}"
        )
        for name in args.transports.split(","):
            try:
                with STORES[name]() as url:
                    got = run_store(name, url, args.runs, args.repeat, kind)
            except Exception as exc:  # a server that cannot start here: say so, keep going
                print(f"{name:10} skipped: {type(exc).__name__}: {exc}")
                continue
            new, raw = got["batched"], got["raw"]
            assert new is not None
            ok = new <= TARGET_S
            failed |= not ok
            ratio = f"{new / raw:.1f}x" if raw else "-"
            print(
                f"{name:10} {_seconds(got['before']):>20} {_seconds(raw):>11} {_seconds(new):>14} {ratio:>7} "
                f"{_seconds(got['command']):>9}  {'ok' if ok else 'MISSED'}",
                flush=True,
            )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

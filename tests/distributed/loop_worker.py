"""A plain training loop with ``attach()`` run by ``torchrun`` on every rank (gloo, CPU); not a test module.

``python -m torch.distributed.run --nproc_per_node 2 loop_worker.py MODE URL RUN OUT CHECK_EVERY`` with MODE
``ddp`` (a ``DistributedDataParallel`` model) or ``fsdp`` (``fully_shard``, FSDP2), and CHECK_EVERY a number of
steps or ``auto`` (``check_every=None``). Rank 0 steers its own run with a :class:`~weavelet_core.Weaver` as a
person would: a swap to Adam, an lr change, a checkpoint, a rollback
(refused under ``torch.distributed``), a key of its own that rank 1 alone refuses, then one every rank accepts, and a
stop, each sent once the previous one has a verdict. Every rank writes
``OUT/rank<N>.json``: its verdicts, the optimizer and lr of every step, where it stopped, its weights.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

MAX_STEPS = 600
VERDICT_TIMEOUT = 60.0

ACTIONS: list[tuple[str, Any]] = [
    ("set", {"optimizer": "adam", "lr": 0.002}),
    ("set", {"lr": 0.0005}),
    ("command", "checkpoint"),
    ("rollback", "latest"),
    ("set", {"tag": 1}),  # rank 1's validator refuses 1: the ranks' verdicts differ
    ("set", {"tag": 2}),  # accepted everywhere: the ranks agree again
    ("command", "stop"),
]


def collective_checks() -> dict[str, Any]:
    """What :class:`Collective` gives on this rank, for the test to compare across ranks."""
    from weavelet_torch.collective import Collective

    collective = Collective.current()
    assert collective is not None
    rank = collective.rank
    big = {"blob": "x" * 200_000, "n": 1}
    return {
        "is_leader": collective.is_leader,
        "none": collective.share(None if rank == 0 else {"ignored": rank}),
        "nested": collective.share({"a": [1, 2.5, "é"], "t": (1, 2), "f": float("inf")} if rank == 0 else rank),
        "big_length": len(collective.share(big if rank == 0 else None)["blob"]),
        "all_true_true": collective.all_true(True),
        "all_true_mixed": collective.all_true(rank == 0),
        "all_same_true": collective.all_same(True),
        "all_same_false": collective.all_same(False),
        "all_same_mixed": collective.all_same(rank == 0),
    }


def start_failures(url: str, run: str) -> dict[str, list[str]]:
    """What each rank raises when rank 0 cannot start: a bad label (``ValueError`` on rank 0), and a run that another
    live attachment owns (``RunOwned`` on rank 0)."""
    from weavelet_torch import attach

    model = torch.nn.Linear(2, 1)
    found: dict[str, list[str]] = {}
    try:
        attach(torch.optim.SGD(model.parameters(), lr=0.1), run=f"{run}-label", url=url, labels={"": "x"}).start()
    except Exception as exc:
        found["labels"] = [type(exc).__name__, str(exc)]
    with attach(torch.optim.SGD(model.parameters(), lr=0.1), run=f"{run}-owned", url=url):
        try:
            attach(torch.optim.SGD(model.parameters(), lr=0.1), run=f"{run}-owned", url=url).start()
        except Exception as exc:
            found["owned"] = [type(exc).__name__, str(exc)]
    return found


def build(mode: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    if mode == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def full_sums(model: torch.nn.Module) -> list[float]:
    """Each parameter's sum over the whole (unsharded) tensor; collective under FSDP2."""
    sums = []
    for param in model.parameters():
        whole = param.full_tensor() if hasattr(param, "full_tensor") else param
        sums.append(float(whole.detach().sum()))
    return sums


def main(mode: str, url: str, run: str, out: str, check_every: int | None) -> None:
    from weavelet_core import Weaver
    from weavelet_torch import attach

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    record: dict[str, Any] = {"rank": rank, "world": dist.get_world_size()}
    if mode == "ddp":
        record["collective"] = collective_checks()
        record["start_failures"] = start_failures(url, run)
    model = build(mode)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10_000)
    data = torch.Generator().manual_seed(100 + rank)
    steps: list[list[Any]] = []
    verdicts: list[dict[str, Any]] = []
    weaver = Weaver(url) if rank == 0 else None
    pending: float | None = None  # when rank 0 sent the action it waits for
    next_action = 0
    checkpoint_sums: list[float] | None = None
    with attach(
        optimizer,
        run=run,
        url=url,
        schedulers=[scheduler],
        model=model,
        checkpoint_dir=Path(out, "checkpoints"),
        report_interval=0.2,
        check_every=check_every,
    ) as live:
        record["has_weavelet"] = live.process is not None
        record["run"] = live.run
        tags: list[int] = []
        record["tags"] = tags

        def refuse_one_on_rank_one(value: Any) -> None:
            if rank != 0 and value == 1:
                raise ValueError(f"rank {rank} refuses tag 1")

        live.on("tag", tags.append, validate=refuse_one_on_rank_one)
        for step in range(1, MAX_STEPS + 1):
            x = torch.randn(16, 8, generator=data)
            loss = torch.nn.functional.mse_loss(model(x), x.sum(dim=1, keepdim=True))
            loss.backward()
            live.optimizer.step()
            live.optimizer.zero_grad()
            scheduler.step()
            steps.append([step, type(live.optimizer).__name__, live.optimizer.param_groups[0]["lr"]])
            if weaver is not None:
                if pending is None and next_action < len(ACTIONS) and step >= 4:
                    kind, what = ACTIONS[next_action]
                    if kind == "set":
                        weaver.set(live.run, what)
                    elif kind == "command":
                        weaver.command(live.run, what)
                    else:
                        weaver.rollback(live.run, what)
                    pending = time.monotonic()
                    next_action += 1
                elif pending is not None:
                    if time.monotonic() - pending > VERDICT_TIMEOUT:
                        raise AssertionError(f"action {next_action} got no verdict within {VERDICT_TIMEOUT:g} s")
                    time.sleep(0.01)  # the other ranks wait for rank 0 in the next broadcast
            verdict = live.poll(step, loss=loss.detach())
            if verdict is not None:
                pending = None
                verdicts.append(
                    {
                        "revision": verdict.revision,
                        "result": verdict.result,
                        "step": verdict.step,
                        "at": step,
                        "message": verdict.message,
                        "commands": verdict.commands,
                        "ranks_agree": verdict.detail.get("ranks_agree", True),
                    }
                )
                if "checkpoint" in verdict.commands:
                    checkpoint_sums = full_sums(model)  # every rank gets the verdict at this step: collective
            if live.should_stop:
                record["stopped_at"] = step
                break
    if weaver is not None:
        weaver.close()
    record["steps"] = steps
    record["verdicts"] = verdicts
    record["checkpoint_sums"] = checkpoint_sums
    first = next(iter(live.optimizer.state.values()), {})
    record["state_types"] = sorted({type(v).__name__ for v in first.values() if isinstance(v, torch.Tensor)})
    record["param_types"] = sorted({type(p).__name__ for p in model.parameters()})
    if mode == "ddp":
        record["weights"] = [p.detach().flatten().tolist() for p in model.parameters()]
    else:
        record["final_sums"] = full_sums(model)
        record["loaded_sums"] = load_checkpoint(verdicts, mode)
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))
    dist.barrier()
    dist.destroy_process_group()


def load_checkpoint(verdicts: list[dict[str, Any]], mode: str) -> list[float] | None:
    """Load the checkpoint command's DCP directory into a fresh model and optimizer; its parameters' sums."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.checkpoint.state_dict_loader import load

    paths = [v["commands"]["checkpoint"] for v in verdicts if "checkpoint" in v["commands"]]
    if not paths:
        return None
    model = build(mode)
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model_state, optimizer_state = get_state_dict(model, [optimizer])
    state = {"model": model_state, "optimizer": optimizer_state}
    load(state, checkpoint_id=paths[-1])
    set_state_dict(model, [optimizer], model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    return full_sums(model)


if __name__ == "__main__":
    main(*sys.argv[1:5], None if sys.argv[5] == "auto" else int(sys.argv[5]))

"""A data-parallel training loop under ``torchrun`` you can reconfigure while it runs (DDP, or FSDP2 with --fsdp).

    pip install "weavelet[torch]"
    torchrun --nproc_per_node 2 examples/torchrun_loop.py --run-id ddp-1
    torchrun --nproc_per_node 2 examples/torchrun_loop.py --run-id fsdp-1 --fsdp

Then, in another terminal (same user and machine, or set WEAVELET_URL to a shared transport on every node):

    weavelet set ddp-1 optimizer=adam lr=0.001   # every rank switches at the same step
    weavelet checkpoint ddp-1                    # every rank saves its part (torch.distributed.checkpoint)
    weavelet stop ddp-1 --wait 30                # every rank leaves the loop at the same step

Only global rank 0 runs the weavelet sidecar; the other ranks get each revision from it by broadcast. Every rank
calls ``attach()``, enters the ``with`` block and calls ``poll()`` with the same step numbers. Runs on CPU with gloo
(as here) or on GPUs with NCCL.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

import weavelet_torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-id", default=None, help="run id (default: $WEAVELET_RUN, else generated and printed)")
    parser.add_argument("--url", default=None, help="transport URL (default: $WEAVELET_URL, else a per-user directory)")
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--fsdp", action="store_true", help="shard the model with FSDP2 (fully_shard) instead of DDP")
    parser.add_argument("--checkpoint-dir", default="checkpoints")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # the same initial weights on every rank
    model: torch.nn.Module = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1)).to(
        device
    )
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(model)  # parameters are now DTensors: a swap builds the new optimizer over the shards
    else:
        model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)

    with weavelet_torch.attach(  # on every rank, after init_process_group
        optimizer,
        run=args.run_id,
        url=args.url,
        schedulers=[scheduler],
        model=model,  # the checkpoint command saves with torch.distributed.checkpoint on every rank
        checkpoint_dir=args.checkpoint_dir,
    ) as live:
        generator = torch.Generator().manual_seed(rank)  # each rank its own batches
        w = torch.randn(16, 1, generator=torch.Generator().manual_seed(0))
        for step in range(1, args.steps + 1):
            x = torch.randn(64, 16, generator=generator).to(device)
            loss = torch.nn.functional.mse_loss(model(x), torch.tanh(x @ w.to(device)))
            live.optimizer.zero_grad()  # always live.optimizer: a swap replaces it on every rank
            loss.backward()
            live.optimizer.step()
            scheduler.step()
            verdict = live.poll(step, loss=loss)  # every rank, every step: the checks happen at the same steps
            if verdict is not None:
                print(f"rank {rank} step {step}: revision {verdict.revision} {verdict.result}", flush=True)
            if live.should_stop:
                print(f"rank {rank} step {step}: stopping as asked", flush=True)
                break
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

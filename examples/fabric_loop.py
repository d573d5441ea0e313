"""A Lightning Fabric training loop you can reconfigure while it runs.

    pip install "weavelet[fabric]"
    python examples/fabric_loop.py --run fab-1

Then, in another terminal (same user, same machine; or set WEAVELET_URL on both sides):

    weavelet set fab-1 momentum=0.8                # edit a hyperparameter in place (SGD's)
    weavelet set fab-1 optimizer=adam lr=0.001     # switch optimizer type inside Fabric's wrapper
    weavelet stop fab-1 --wait 30                  # end the loop cleanly
    weavelet status fab-1
"""

from __future__ import annotations

import argparse

import torch
from lightning.fabric import Fabric

import weavelet_torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--run", "--run-id", dest="run", default=None,
        help="run id (default: $WEAVELET_RUN, else generated and printed); under torchrun write --run-id, since "
        "torchrun takes --run for its own --run-path",
    )  # fmt: skip
    parser.add_argument("--url", default=None, help="transport URL (default: $WEAVELET_URL, else a per-user directory)")
    parser.add_argument("--steps", type=int, default=300_000, help="optimizer steps (default 300000, a few minutes)")
    args = parser.parse_args()

    fabric = Fabric(accelerator="auto", devices=1)
    fabric.seed_everything(0)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 16, generator=generator)
    y = torch.tanh(x @ torch.randn(16, 1, generator=generator))
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    model, optimizer = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)
    x, y = fabric.to_device(x), fabric.to_device(y)

    # Give attach() what fabric.setup returned: a switch puts the new optimizer inside the same wrapper, which
    # keeps stepping through Fabric's strategy and precision plugin.
    with weavelet_torch.attach(optimizer, run=args.run, url=args.url, schedulers=[scheduler]) as live:
        step = 0
        for step in range(1, args.steps + 1):
            batch = torch.randint(0, len(x), (64,), generator=generator)
            loss = torch.nn.functional.mse_loss(model(x[batch]), y[batch])
            fabric.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
            verdict = live.poll(step, loss=loss)  # the optimizer-step boundary
            if verdict is not None:
                print(f"step {step}: revision {verdict.revision} {verdict.result}: {verdict.message}", flush=True)
            if live.should_stop:
                break
    print(f"stopped at step {step} with {type(optimizer.optimizer).__name__}; loss {loss.item():.4f}", flush=True)


if __name__ == "__main__":  # the weavelet sidecar is started with 'spawn', which re-imports this module
    main()

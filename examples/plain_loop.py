"""A hand-written PyTorch training loop you can reconfigure while it runs.

    pip install "weavelet[torch]"
    python examples/plain_loop.py --run mlp-1

Then, in another terminal (same user, same machine; or set WEAVELET_URL on both sides):

    weavelet set mlp-1 optimizer=adam lr=0.001      # switch optimizer type, keeping the schedule
    weavelet set mlp-1 lr=0.0003 weight_decay=0.01   # edit hyperparameters in place
    weavelet set mlp-1 grad_clip=0.5                 # a key of this script's own (see the handler below)
    weavelet checkpoint mlp-1                        # save a checkpoint now
    weavelet stop mlp-1 --wait 30                    # end the loop cleanly
    weavelet status mlp-1                            # step, loss, active optimizer, last applied revision

Each start is a new incarnation of the run: starting it again with the same ``--run`` does not inherit the
earlier start's settings or its commands (one line on stderr says what the store held).

Stop it and run the same command with ``--resume PATH`` (a checkpoint it wrote) to continue with the
optimizer that was active, its state, and only revisions not yet applied.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

import weavelet_torch


def make_data(samples: int = 4096, features: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(samples, features, generator=generator)
    w = torch.randn(features, 1, generator=generator)
    return x, torch.tanh(x @ w) + 0.05 * torch.randn(samples, 1, generator=generator)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--run", "--run-id", dest="run", default=None,
        help="run id (default: $WEAVELET_RUN, else generated and printed); under torchrun write --run-id, since "
        "torchrun takes --run for its own --run-path",
    )  # fmt: skip
    parser.add_argument("--url", default=None, help="transport URL (default: $WEAVELET_URL, else a per-user directory)")
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--resume", default=None, help="a checkpoint written by the checkpoint command")
    parser.add_argument("--checkpoint-dir", default="checkpoints")
    args = parser.parse_args()

    x, y = make_data()
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)
    grad_clip: dict[str, float | None] = {"value": None}

    checkpoint: dict[str, Any] | None = None
    start = 0
    if args.resume:
        checkpoint = torch.load(args.resume, weights_only=False)
        model.load_state_dict(checkpoint["model"])
        start = checkpoint["step"]

    live = weavelet_torch.attach(
        optimizer,
        run=args.run,
        url=args.url,
        schedulers=[scheduler],
        model=model,  # enables the checkpoint command
        checkpoint_dir=args.checkpoint_dir,
        state=checkpoint["weavelet"] if checkpoint else None,  # recreates the optimizer that was active
    )
    if checkpoint:
        live.optimizer.load_state_dict(checkpoint["optimizer"])  # into the recreated optimizer
        scheduler.load_state_dict(checkpoint["schedulers"][0])

    def set_grad_clip(value: Any) -> None:
        grad_clip["value"] = float(value)

    def check_grad_clip(value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ValueError("send a positive number")

    live.on("grad_clip", set_grad_clip, validate=check_grad_clip)

    with live:  # the weavelet sidecar runs while the loop runs, and stops on every way out
        generator = torch.Generator().manual_seed(start)
        for step in range(start + 1, args.steps + 1):
            batch = torch.randint(0, len(x), (64,), generator=generator)
            loss = torch.nn.functional.mse_loss(model(x[batch]), y[batch])
            live.optimizer.zero_grad()  # always live.optimizer: a swap replaces it
            torch.autograd.backward(loss)
            if grad_clip["value"] is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip["value"])
            live.optimizer.step()
            scheduler.step()
            verdict = live.poll(step, loss=loss)  # the optimizer-step boundary: apply what arrived
            if verdict is not None:
                print(f"step {step}: revision {verdict.revision} {verdict.result}: {verdict.message}", flush=True)
            if step % 1000 == 0:
                print(f"step {step}: loss {loss.item():.4f} ({type(live.optimizer).__name__})", flush=True)
            if live.should_stop:
                print(f"step {step}: stopping as asked", flush=True)
                break


if __name__ == "__main__":
    main()

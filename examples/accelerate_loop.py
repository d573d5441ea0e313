"""An accelerate training loop with gradient accumulation that you can reconfigure while it runs.

    pip install "weavelet[transformers]"      # accelerate comes with it
    python examples/accelerate_loop.py --run acc-1

Then, in another terminal (same user, same machine; or set WEAVELET_URL on both sides):

    weavelet set acc-1 optimizer=adam lr=0.001     # switch optimizer type inside accelerate's wrapper
    weavelet set acc-1 lr_scale=0.5                # scale the whole schedule
    weavelet stop acc-1 --wait 30                  # end the loop cleanly
    weavelet status acc-1

Changes land only at optimizer steps: ``live.poll`` does nothing inside an accumulation window
(``accelerator.sync_gradients`` false).
"""

from __future__ import annotations

import argparse

import torch
from accelerate import Accelerator

import weavelet_torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--run", "--run-id", dest="run", default=None,
        help="run id (default: $WEAVELET_RUN, else generated and printed); under torchrun write --run-id, since "
        "torchrun takes --run for its own --run-path",
    )  # fmt: skip
    parser.add_argument("--url", default=None, help="transport URL (default: $WEAVELET_URL, else a per-user directory)")
    parser.add_argument("--steps", type=int, default=20_000, help="optimizer steps (default 20000)")
    parser.add_argument("--accumulate", type=int, default=4, help="micro-batches per optimizer step (default 4)")
    args = parser.parse_args()

    accelerator = Accelerator(gradient_accumulation_steps=args.accumulate)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 16, generator=generator)
    y = torch.tanh(x @ torch.randn(16, 1, generator=generator))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32, shuffle=True)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    # Give attach() what accelerate returned: a switch puts the new optimizer inside the same wrapper, so this
    # loop keeps stepping `optimizer` (accumulation and mixed precision stay as accelerate set them up).
    with weavelet_torch.attach(optimizer, run=args.run, url=args.url, schedulers=[scheduler]) as live:
        step = 0
        while step < args.steps and not live.should_stop:
            for inputs, targets in loader:
                with accelerator.accumulate(model):
                    loss = torch.nn.functional.mse_loss(model(inputs), targets)
                    accelerator.backward(loss)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                if accelerator.sync_gradients:
                    step += 1
                verdict = live.poll(step, loss=loss)  # applies only when accelerator.sync_gradients
                if verdict is not None:
                    print(f"step {step}: revision {verdict.revision} {verdict.result}: {verdict.message}", flush=True)
                if live.should_stop or step >= args.steps:
                    break
    inner = type(optimizer.optimizer).__name__
    print(f"stopped at step {step} with {inner}; loss {loss.item():.4f}", flush=True)


if __name__ == "__main__":  # the weavelet sidecar is started with 'spawn', which re-imports this module
    main()

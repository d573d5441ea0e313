"""A Hugging Face Trainer you can reconfigure while it trains (a tiny GPT-2 on random tokens; no download).

    pip install "weavelet[transformers]"
    python examples/hf_trainer.py --run gpt-1

Then, in another terminal (same user, same machine; or set WEAVELET_URL on both sides):

    weavelet set gpt-1 optimizer=adam              # switch AdamW -> Adam inside the Trainer
    weavelet set gpt-1 lr_scale=0.5                # halve the whole learning-rate schedule
    weavelet set gpt-1 param_groups.0.weight_decay=0.01   # edit a hyperparameter of one param group in place
    weavelet checkpoint gpt-1                      # the Trainer saves output_dir/checkpoint-<step> now
    weavelet stop gpt-1 --wait 30                  # end training cleanly after this step
    weavelet status gpt-1                          # step, logged loss, active optimizer

Run it again with ``--resume output/checkpoint-<step>``: training continues with the optimizer type and
hyperparameters that were live, and applies only revisions written after that checkpoint.
"""

from __future__ import annotations

import argparse

import torch
import transformers

from weavelet_transformers import WeaveletCallback


class RandomTokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """256 random sequences of 32 tokens from a vocabulary of 128; the labels are the inputs (causal LM)."""

    def __init__(self) -> None:
        self.ids = torch.randint(0, 128, (256, 32), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--run", "--run-id", dest="run", default=None,
        help="run id (default: $WEAVELET_RUN, else generated and printed); under torchrun write --run-id, since "
        "torchrun takes --run for its own --run-path",
    )  # fmt: skip
    parser.add_argument("--url", default=None, help="transport URL (default: $WEAVELET_URL, else a per-user directory)")
    parser.add_argument("--steps", type=int, default=20_000, help="optimizer steps (default 20000)")
    parser.add_argument("--output-dir", default="output", help="where the Trainer saves checkpoints")
    parser.add_argument("--resume", default=None, help="a checkpoint folder to resume from")
    args = parser.parse_args()

    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=32)
    model = transformers.GPT2LMHeadModel(config)
    training = transformers.TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        lr_scheduler_type="cosine",
        warmup_steps=20,
        logging_steps=50,
        save_strategy="no",  # checkpoints when asked (weavelet checkpoint RUN); resumable all the same
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
    )
    weavelet = WeaveletCallback(run=args.run, url=args.url)
    trainer = transformers.Trainer(model=model, args=training, train_dataset=RandomTokens(), callbacks=[weavelet])
    result = trainer.train(resume_from_checkpoint=args.resume)
    print(f"trained {result.global_step} steps; run {weavelet.run!r}: {weavelet.applier.describe()}", flush=True)


if __name__ == "__main__":  # the weavelet sidecar is started with 'spawn', which re-imports this module
    main()

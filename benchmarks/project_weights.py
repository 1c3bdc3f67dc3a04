"""Held-out evaluation of VeLO weights made by velo_scale's meta-training.

Trains the embedded default recipe's model (MLP 784-256-128-10 on
Fashion-MNIST, 600 steps of batch 128 — a dataset and model size the
meta-training never saw) with each optimizer given on the command line and
prints final train loss, test loss and test accuracy side by side.

Usage:
  python benchmarks/project_weights.py --weights velo_scale/project_weights/params \\
      [--weights OTHER ...] [--num_steps 600] [--seeds 0,1]
"""

from __future__ import annotations

import argparse
import functools

import numpy as np

from velo_scale.models import MLP
from velo_scale.train import optimizers, train


def run(optimizer, num_steps: int, seed: int) -> dict[str, float]:
    result = train(
        model=MLP(hidden=(256, 128)),
        optimizer=optimizer,
        num_steps=num_steps,
        data="fashion_mnist",
        batch_size=128,
        mesh_shape=(1, 1),
        seed=seed,
        progress=False,
    )
    return {"train_loss": result.final_loss, **result.eval_metrics}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--weights", action="append", default=[])
    parser.add_argument("--num_steps", type=int, default=600)
    parser.add_argument("--seeds", default="0")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    candidates = {
        f"velo[{w}]": functools.partial(optimizers.velo, weights=w)
        for w in args.weights
    }
    candidates["adamw (lr 1e-3, warm-up + cosine)"] = optimizers.adamw
    candidates["adamw (lr 3e-3, warm-up + cosine)"] = functools.partial(
        optimizers.adamw, learning_rate=3e-3
    )
    rows = []
    for name, opt in candidates.items():
        runs = [run(opt, args.num_steps, s) for s in seeds]
        mean = {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}
        rows.append((name, mean))
    print(f"\nFashion-MNIST MLP, {args.num_steps} steps, seeds {seeds} (means)\n")
    print("| optimizer | final train loss | test loss | test accuracy |")
    print("|---|---|---|---|")
    for name, m in rows:
        print(
            f"| {name} | {m['train_loss']:.4f} | {m['loss']:.4f} | {m['accuracy']:.4f} |"
        )


if __name__ == "__main__":
    main()

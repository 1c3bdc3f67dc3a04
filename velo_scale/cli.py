"""`velo-scale` command line (also `python -m velo_scale`)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="velo-scale", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train an MLP on Fashion-MNIST with VeLO")
    demo.add_argument("--optimizer", default="velo", choices=["velo", "adamw"])
    demo.add_argument("--num_steps", type=int, default=500)
    demo.add_argument("--batch_size", type=int, default=128)
    demo.add_argument(
        "--weights",
        default=None,
        help="VeLO weights file (default: $VELO_SCALE_WEIGHTS, cache, download)",
    )
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from velo_scale._src.weights import WeightsError

    try:
        if args.command == "demo":
            from velo_scale.demo import run_demo

            run_demo(
                optimizer=args.optimizer,
                num_steps=args.num_steps,
                batch_size=args.batch_size,
                weights=args.weights,
                seed=args.seed,
            )
    except (WeightsError, FileNotFoundError) as e:
        print(f"velo-scale: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

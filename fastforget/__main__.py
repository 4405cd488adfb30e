"""Command line: ``python -m fastforget demo [flags]`` (also the ``fastforget`` console script)."""

import argparse
import sys

from fastforget.dispatch import BACKENDS


def _parser():
    from fastforget.demo.config import DEFAULT_EPOCHS, DEFAULT_LR, STRATEGIES, DemoConfig

    defaults = DemoConfig()
    parser = argparse.ArgumentParser(
        prog="fastforget",
        description="fastforget: fused kernels against catastrophic forgetting (EWC, rehearsal, LoRA, gradient "
        "protection). Commands:",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="continual learning on scikit-learn's digits: forgetting and each defence against it",
        description="Train every strategy through split-digits (task-IL and class-IL) and permuted-digits "
        "(domain-IL); print a table of accuracy, forgetting, backward transfer and protection overhead, and write "
        "table.md, results.json and accuracy.png to --out.",
    )
    demo.add_argument(
        "--benchmark",
        choices=["split", "permuted", "all"],
        default="all",
        help="which benchmarks (default %(default)s)",
    )
    demo.add_argument(
        "--strategies", default=",".join(STRATEGIES), help=f"comma-separated, from {', '.join(STRATEGIES)}"
    )
    demo.add_argument("--epochs", type=int, help=f"epochs per task (default: {DEFAULT_EPOCHS})")
    demo.add_argument("--seeds", type=int, default=defaults.seeds, help="run seeds 0..N-1; N > 1 reports mean ± std")
    demo.add_argument("--out", default=defaults.out, help="output folder (default %(default)s)")
    demo.add_argument("--backend", choices=["auto", *BACKENDS], default="auto", help="backend of the fused ops")
    demo.add_argument("--device", default=defaults.device, help="default: cuda when present, else cpu")
    demo.add_argument("--optimizer", choices=sorted(DEFAULT_LR), default=defaults.optimizer, help="default %(default)s")
    demo.add_argument("--lr", type=float, help=f"learning rate (default {DEFAULT_LR})")
    demo.add_argument(
        "--ewc-lambda", type=float, default=defaults.ewc_lambda, help="EWC's lambda (default %(default)s)"
    )
    demo.add_argument(
        "--replay-capacity", type=int, default=defaults.replay_capacity, help="replay examples (default %(default)s)"
    )
    demo.add_argument("--threads", type=int, default=defaults.threads, help="CPU threads (default %(default)s)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _config(args):
    from fastforget.demo.config import STRATEGIES, DemoConfig

    strategies = tuple(s.strip() for s in args.strategies.split(",") if s.strip())
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown or not strategies:
        raise SystemExit(f"fastforget demo: unknown strategies {unknown}; choose from {', '.join(STRATEGIES)}")
    if (args.epochs is not None and args.epochs < 1) or args.seeds < 1 or args.threads < 1:
        raise SystemExit("fastforget demo: --epochs, --seeds and --threads must be >= 1")
    return DemoConfig(
        benchmarks=("split", "permuted") if args.benchmark == "all" else (args.benchmark,),
        strategies=strategies,
        epochs=args.epochs,
        seeds=args.seeds,
        out=args.out,
        backend=args.backend,
        device=args.device,
        optimizer=args.optimizer,
        lr=args.lr,
        ewc_lambda=args.ewc_lambda,
        replay_capacity=args.replay_capacity,
        threads=args.threads,
        progress=not args.no_progress,
    )


def main(argv=None):
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from fastforget.demo import run_demo

        run_demo(_config(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())

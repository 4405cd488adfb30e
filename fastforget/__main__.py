"""Command line: ``python -m fastforget demo [flags]`` and ``python -m fastforget build`` (also the ``fastforget``
console script)."""

import argparse
import sys

from fastforget.dispatch import BACKENDS


def _parser():
    from fastforget.demo.config import DEFAULT_EPOCHS, DEFAULT_LR, LM_STRATEGIES, STRATEGIES, DemoConfig
    from fastforget.fisher import ESTIMATORS

    defaults = DemoConfig()
    parser = argparse.ArgumentParser(
        prog="fastforget",
        description="fastforget: fused kernels against catastrophic forgetting (EWC, rehearsal, LoRA, gradient "
        "protection). Commands:",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="forgetting and each defence against it: digits (an MLP) and a small Llama (prose, then Python code)",
        description="Train every strategy through split-digits (task-IL and class-IL) and permuted-digits "
        "(domain-IL), then (lm) pre-train a small Llama on Python's help topics and fine-tune it on the standard "
        "library's source; print the tables (accuracy, forgetting, backward transfer, protection overhead; LM: "
        "held-out cross-entropy, forgetting, learning, tokens/s) and write table.md, results.json, accuracy.png and "
        "lm_tradeoff.png to --out.",
    )
    demo.add_argument(
        "--benchmark",
        choices=["split", "permuted", "digits", "lm", "all"],
        default="all",
        help="which benchmarks: digits = split + permuted, all = digits + lm (default %(default)s)",
    )
    demo.add_argument(
        "--strategies",
        help=f"comma-separated (default: all of each benchmark's); digits: {', '.join(STRATEGIES)}; "
        f"lm: {', '.join(LM_STRATEGIES)}",
    )
    demo.add_argument("--epochs", type=int, help=f"epochs per task (default: {DEFAULT_EPOCHS})")
    demo.add_argument("--seeds", type=int, default=defaults.seeds, help="run seeds 0..N-1; N > 1 reports mean ± std")
    demo.add_argument("--out", default=defaults.out, help="output folder (default %(default)s)")
    demo.add_argument("--backend", choices=["auto", *BACKENDS], default="auto", help="backend of the fused ops")
    demo.add_argument("--device", default=defaults.device, help="default: cuda when present, else cpu")
    demo.add_argument("--optimizer", choices=sorted(DEFAULT_LR), default=defaults.optimizer, help="default %(default)s")
    demo.add_argument("--lr", type=float, help=f"learning rate (default {DEFAULT_LR})")
    demo.add_argument(
        "--ewc-lambda",
        type=float,
        help=f"EWC's lambda, of every benchmark that runs (default {defaults.ewc_lambda:g} for digits, "
        f"{defaults.lm.ewc_lambda:g} for lm)",
    )
    demo.add_argument(
        "--ewc-estimator",
        choices=ESTIMATORS,
        default=defaults.lm.ewc_estimator,
        help="the Fisher estimator of lm's EWC strategies and fisher-merge (default %(default)s)",
    )
    demo.add_argument(
        "--estimator-sweep",
        help=f"comma-separated Fisher estimators ({', '.join(ESTIMATORS)}): lm's ewc and its lambda sweep run "
        "again with each, to compare their scales (default none)",
    )
    demo.add_argument(
        "--state-bits", type=int, choices=(32, 8), default=defaults.lm.state_bits,
        help="lm: ProtectedAdamW's moments in 32-bit or bitsandbytes' 8-bit block-wise format (default %(default)s)",
    )  # fmt: skip
    demo.add_argument(
        "--fisher-bits", type=int, choices=(32, 8), default=defaults.lm.fisher_bits,
        help="lm: the EWC strategies' Fisher in fp32 or 8-bit block-wise with a bf16 anchor (default %(default)s)",
    )  # fmt: skip
    demo.add_argument(
        "--replay-capacity", type=int, default=defaults.replay_capacity, help="replay examples (default %(default)s)"
    )
    demo.add_argument("--threads", type=int, help="CPU threads (default: 1 for digits, every core for lm)")
    demo.add_argument(
        "--lm-steps", type=int, default=defaults.lm.steps, help="LM fine-tuning steps (default %(default)s)"
    )
    demo.add_argument(
        "--lm-cache", help="folder of the pre-trained LMs (default $FASTFORGET_CACHE or ~/.cache/fastforget)"
    )
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    commands.add_parser(
        "build",
        help="build the C++ (and CUDA) kernels now, into the cache the first op would build them into",
        description="Build fastforget's native kernels just in time for this torch, CPU and sources (ops build "
        "them on first use otherwise), and print where they are. Nothing to do when they are built.",
    )
    return parser


def _build():
    from fastforget import _extension

    if _extension.LOADED_FROM:
        print(f"fastforget: the kernels are built: {_extension.LOADED_FROM}")
        return 0
    try:
        library = _extension.build()
    except (_extension.BuildError, OSError) as error:
        print(f"fastforget: {error}", file=sys.stderr)
        return 1
    print(f"fastforget: the kernels are built: {library}")
    return 0


def _config(args):
    from dataclasses import replace

    from fastforget.demo.config import LM_STRATEGIES, STRATEGIES, DemoConfig
    from fastforget.fisher import ESTIMATORS

    benchmarks = {"digits": ("split", "permuted"), "all": ("split", "permuted", "lm")}.get(
        args.benchmark, (args.benchmark,)
    )
    strategies = None
    if args.strategies is not None:
        strategies = tuple(s.strip() for s in args.strategies.split(",") if s.strip())
        known = set(STRATEGIES) | set(LM_STRATEGIES)
        unknown = [s for s in strategies if s not in known]
        if unknown or not strategies:
            raise SystemExit(f"fastforget demo: unknown strategies {unknown}; choose from {', '.join(sorted(known))}")
    for value, flag in ((args.epochs, "--epochs"), (args.threads, "--threads"), (args.seeds, "--seeds"),
                        (args.lm_steps, "--lm-steps")):  # fmt: skip
        if value is not None and value < 1:
            raise SystemExit(f"fastforget demo: {flag} must be >= 1")
    if args.ewc_lambda is not None and not args.ewc_lambda >= 0:  # NaN fails too
        raise SystemExit(f"fastforget demo: --ewc-lambda must be >= 0, got {args.ewc_lambda}")
    sweep = tuple(s.strip() for s in (args.estimator_sweep or "").split(",") if s.strip())
    unknown = [s for s in sweep if s not in ESTIMATORS]
    if unknown:
        raise SystemExit(f"fastforget demo: unknown --estimator-sweep {unknown}; choose from {', '.join(ESTIMATORS)}")
    config = DemoConfig(
        benchmarks=benchmarks,
        strategies=strategies,
        epochs=args.epochs,
        seeds=args.seeds,
        out=args.out,
        backend=args.backend,
        device=args.device,
        optimizer=args.optimizer,
        lr=args.lr,
        replay_capacity=args.replay_capacity,
        threads=args.threads,
        progress=not args.no_progress,
    )
    config.lm = replace(config.lm, steps=args.lm_steps, cache=args.lm_cache, ewc_estimator=args.ewc_estimator,
                        estimator_sweep=sweep, state_bits=args.state_bits, fisher_bits=args.fisher_bits)  # fmt: skip
    if args.ewc_lambda is not None:
        config.ewc_lambda = args.ewc_lambda
        config.lm.ewc_lambda = args.ewc_lambda
    empty = [b for b in benchmarks if not config.strategies_for(b)]
    if empty:
        raise SystemExit(f"fastforget demo: none of --strategies {args.strategies} runs on {', '.join(empty)}")
    return config


def main(argv=None):
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from fastforget.demo import run_demo

        run_demo(_config(args))
    elif args.command == "build":
        return _build()
    return 0


if __name__ == "__main__":
    sys.exit(main())

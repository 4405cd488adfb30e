"""Part 2 of the device check (bench/gpu_check.sh tables): every benchmark table on the GPU, saved as JSON and
Markdown.

Runs each op's CLI benchmark (cuda and triton against the eager reference, torch._foreach_* where one exists and
torch.compile of the reference, each as a fraction of the add and copy bandwidth measured in the same run), then
lora_linear in bf16 at M = 8192, in = out = 4096, r = 16 (triton vs cuda/cuBLAS vs PEFT's formula), and the 8-bit
AdamW step against torch's fused AdamW and bitsandbytes' CUDA AdamW8bit. A failing benchmark is recorded and the
others still run.

    python bench/gpu_tables.py --out DIR [--repeats N] [--only NAME ...]
writes DIR/tables.json ({name: {"argv", "seconds", "output", "tables", "error"}}) and DIR/tables.md.
"""

import argparse
import contextlib
import importlib
import io
import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import harness  # noqa: E402

# (name, module, extra CLI arguments), most valuable first
RUNS = [
    ("ewc_penalty", "bench_ewc_penalty", []),
    ("lora_linear_bf16_8192x4096x4096_r16", "bench_lora_linear",
     ["--tokens", "8192", "--features", "4096", "--rank", "16", "--dtype", "bfloat16", "--scale", "1"]),
    ("grad_ema", "bench_grad_ema", []),
    ("grad_moments", "bench_grad_moments", []),
    ("fisher_update", "bench_fisher_update", []),
    ("scale_grads", "bench_scale_grads", []),
    ("protect", "bench_protect", []),
    # the 8-bit step (cuda, triton; EWC with an 8-bit Fisher) vs torch.optim.AdamW(fused=True) and bitsandbytes'
    # CUDA AdamW8bit, with the optimizer state per parameter
    ("protected_adamw8bit_step", "bench_protected_adamw8bit_step", ["--bnb-repeats", "10"]),
]  # fmt: skip


def run_one(module_name, argv):
    """Runs bench/<module_name>.py's main() with `argv`; returns (printed output, its tables, error or None)."""
    harness.RECORDED_TABLES = []
    out, error = io.StringIO(), None
    saved = sys.argv
    sys.argv = [module_name, *argv]
    try:
        with contextlib.redirect_stdout(out):
            importlib.import_module(f"bench.{module_name}").main()
    except Exception:  # noqa: BLE001  (one benchmark's failure must not hide the others' tables)
        error = traceback.format_exc()
    finally:
        sys.argv = saved
    tables, harness.RECORDED_TABLES = harness.RECORDED_TABLES, None
    return out.getvalue(), tables, error


def markdown(results, machine):
    lines = [f"# fastforget benchmark tables\n\n{machine}\n"]
    for name, result in results.items():
        lines.append(f"## {name}\n\n`{' '.join(result['argv']) or '(defaults)'}`, {result['seconds']:.0f} s\n")
        text = [line for line in result["output"].splitlines() if line.strip() and not line.startswith("  ")]
        lines += [f"{line}\n" for line in text[:1]]
        for table in result["tables"]:
            lines.append("| " + " | ".join(table["headers"]) + " |")
            lines.append("|" + "---|" * len(table["headers"]))
            lines += ["| " + " | ".join(row) + " |" for row in table["rows"]]
            lines.append("")
        if result["error"]:
            lines.append(f"**failed:**\n\n```\n{result['error']}\n```\n")
    return "\n".join(lines)


def machine_line():
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU only"
    return f"{device}; torch {torch.__version__}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for tables.json and tables.md")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per variant (median)")
    parser.add_argument("--only", nargs="*", help="names from RUNS to run (default: all)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, module, extra in RUNS:
        if args.only and name not in args.only:
            continue
        argv = ["--repeats", str(args.repeats), *extra]
        start = time.perf_counter()
        output, tables, error = run_one(module, argv)
        results[name] = dict(argv=argv, seconds=time.perf_counter() - start, output=output, tables=tables, error=error)
        print(output, error or "", sep="", flush=True)
        # written after every benchmark, so a run cut off by its timeout still leaves the finished tables
        (args.out / "tables.json").write_text(json.dumps(dict(machine=machine_line(), results=results), indent=1))
        (args.out / "tables.md").write_text(markdown(results, machine_line()))
    failed = [name for name, result in results.items() if result["error"]]
    if failed:
        sys.exit(f"benchmarks failed: {failed}")


if __name__ == "__main__":
    main()

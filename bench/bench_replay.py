"""Benchmarks of ff.ReplayBuffer: add + sample throughput of every policy against a per-example Python version.

The stream (scale 1): 1,000,000 MNIST-sized examples (784 fp32 pixels in [0, 1) and an int64 label in 0..9) offered
in batches of 256 to a buffer of capacity 10,000, with a rehearsal sample of 128 after every add. The examples are
slices of a source of 65,536 random examples, cycled (a batch is a view: no copy before the buffer's own).
  vectorised   fastforget.replay.ReplayBuffer(capacity, policy): tensor ops over each whole batch.
  per_example  the same policy written the straightforward way: a Python list of (pixels, label) copies, a loop over
               each batch's examples with Python's `random` draws, `random.sample` + `torch.stack` to sample.
Rates are examples offered per second of add + sample; "vs per-example" divides two rates over the same examples.

diversity: feature_fn is a fixed random projection of the pixels to 32 dimensions (standing in for a model's
embedding), pool_size = capacity. A reselection (one per pool_size examples once full) runs the greedy over
capacity + pool_size candidates, O(capacity (capacity + pool_size) 32), so it is timed on the first 50,000 examples
(4 reselections). Its per-example version loops over the candidates at every greedy step (one torch.dist each): at
capacity 10,000 that is 2e8 calls per reselection, so both versions are also compared at capacity 256, pool 256, on
the first 2,048 examples (7 reselections).

FF_BENCH_SCALE multiplies every count above (examples, capacities, prefixes, the source); FF_BENCH_SMOKE=1 uses
scale 0.02. Each row runs once (CLI: the median of --repeats runs).

pytest: FF_BENCH_SMOKE=1 pytest bench/bench_replay.py [--benchmark-disable]
CLI:    python bench/bench_replay.py [--scale S] [--repeats N]   (or python -m bench.bench_replay)
"""

import argparse
import math
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

if __package__ in (None, ""):  # run as a script: make `bench` (and an uninstalled fastforget) importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import harness  # noqa: E402
from fastforget.replay import POLICIES, ReplayBuffer  # noqa: E402

PIXELS, CLASSES, EMBEDDING = 784, 10, 32
BATCH, SAMPLE = 256, 128


def scaled(count: int, scale: float, minimum: int = 1) -> int:
    return max(minimum, round(count * scale))


@dataclass(frozen=True)
class Case:
    """One row: a policy, an implementation, a capacity and how many examples of the stream it is offered."""

    policy: str
    implementation: str  # "vectorised" or "per_example"
    capacity: int
    examples: int
    compared: bool  # a (vectorised, per_example) pair over the same examples

    @property
    def name(self) -> str:
        return f"{self.policy}-{self.implementation}-{self.capacity}-{self.examples}"


def cases(scale: float) -> list[Case]:
    rows = []
    for policy in POLICIES:
        if policy == "diversity":
            rows.append(Case(policy, "vectorised", scaled(10_000, scale), scaled(50_000, scale), False))
            pair = (scaled(256, scale), scaled(2_048, scale))
        else:
            pair = (scaled(10_000, scale), scaled(1_000_000, scale))
        rows += [Case(policy, implementation, *pair, True) for implementation in ("vectorised", "per_example")]
    return rows


@dataclass
class Stream:
    pixels: torch.Tensor  # (source, 784) fp32
    labels: torch.Tensor  # (source,) int64
    projection: torch.Tensor  # (784, 32): the diversity features


def make_stream(scale: float) -> Stream:
    generator = torch.Generator().manual_seed(0)
    source = max(BATCH, scaled(65_536, scale) // BATCH * BATCH)  # a whole number of batches: no batch wraps
    return Stream(
        torch.rand(source, PIXELS, generator=generator),
        torch.randint(CLASSES, (source,), generator=generator),
        torch.randn(PIXELS, EMBEDDING, generator=generator) / math.sqrt(PIXELS),
    )


def offer(stream: Stream, buffer, examples: int) -> None:
    """Offer `examples` examples in batches of BATCH, sampling a rehearsal batch after every add."""
    for start in range(0, examples, BATCH):
        offset = start % len(stream.labels)
        stop = offset + min(BATCH, examples - start)
        buffer.add((stream.pixels[offset:stop], stream.labels[offset:stop]))
        buffer.sample(min(SAMPLE, len(buffer)))


class PerExampleBuffer:
    """Each policy the straightforward way: Python lists of example copies, one Python step per example."""

    def __init__(self, capacity: int, policy: str, projection: torch.Tensor, seed: int = 0):
        self.capacity, self.policy, self.projection = capacity, policy, projection
        self.rng = random.Random(seed)
        self.items, self.pool, self.seen = [], [], 0  # pool: diversity's waiting examples
        self.by_class, self.class_seen = {}, {}  # class_balanced: label -> list of examples / examples offered

    def __len__(self) -> int:
        return sum(map(len, self.by_class.values())) if self.policy == "class_balanced" else len(self.items)

    def add(self, batch) -> None:
        x, y = batch
        features = x @ self.projection if self.policy == "diversity" else [None] * len(x)
        for pixels, label, feature in zip(x, y, features):
            self.offer(pixels, label, feature)
            self.seen += 1

    def offer(self, pixels, label, feature) -> None:
        if self.policy == "class_balanced":
            self.offer_to_class(pixels, label)
        elif len(self.items) < self.capacity:
            self.items.append((pixels.clone(), label.clone(), feature))
        elif self.policy == "reservoir":
            j = self.rng.randrange(self.seen + 1)
            if j < self.capacity:
                self.items[j] = (pixels.clone(), label.clone(), feature)
        elif self.policy == "random_replace":
            self.items[self.rng.randrange(self.capacity)] = (pixels.clone(), label.clone(), feature)
        else:
            self.pool.append((pixels.clone(), label.clone(), feature))
            if len(self.pool) == self.capacity:
                candidates = self.items + self.pool
                self.items = [candidates[i] for i in greedy_k_center([c[2] for c in candidates], self.capacity)]
                self.pool = []

    def offer_to_class(self, pixels, label) -> None:
        key = label.item()
        if key not in self.by_class:
            self.by_class[key], self.class_seen[key] = [], 0
            for index, examples in enumerate(self.by_class.values()):
                quota = self.quota(index)
                if len(examples) > quota:
                    examples[:] = self.rng.sample(examples, quota)
        examples, quota = self.by_class[key], self.quota(list(self.by_class).index(key))
        if len(examples) < quota:
            examples.append((pixels.clone(), label.clone(), None))
        else:
            j = self.rng.randrange(self.class_seen[key] + 1)
            if j < quota:
                examples[j] = (pixels.clone(), label.clone(), None)
        self.class_seen[key] += 1

    def quota(self, index: int) -> int:
        classes = len(self.by_class)
        return self.capacity // classes + (index < self.capacity % classes)

    def sample(self, k: int):
        stored = [e for es in self.by_class.values() for e in es] if self.policy == "class_balanced" else self.items
        picked = self.rng.sample(stored, k)
        return torch.stack([e[0] for e in picked]), torch.stack([e[1] for e in picked])


def greedy_k_center(features: list[torch.Tensor], k: int) -> list[int]:
    """Farthest-point greedy with a Python loop over the candidates at every step."""
    mean = torch.stack(features).mean(0)
    pick = max(range(len(features)), key=lambda i: torch.dist(features[i], mean).item())
    nearest, chosen = [math.inf] * len(features), []
    for _ in range(k):
        chosen.append(pick)
        for i, feature in enumerate(features):
            nearest[i] = min(nearest[i], torch.dist(feature, features[pick]).item())
        nearest[pick] = -math.inf
        pick = max(range(len(features)), key=nearest.__getitem__)
    return chosen


def make_buffer(case: Case, stream: Stream):
    if case.implementation == "per_example":
        return PerExampleBuffer(case.capacity, case.policy, stream.projection)
    options = {"feature_fn": lambda batch: batch[0] @ stream.projection} if case.policy == "diversity" else {}
    return ReplayBuffer(case.capacity, case.policy, generator=torch.Generator().manual_seed(0), **options)


def run(case: Case, stream: Stream):
    """A function offering the case's examples to a fresh buffer."""
    return lambda: offer(stream, make_buffer(case, stream), case.examples)


@pytest.fixture(scope="module")
def stream() -> Stream:
    return make_stream(harness.bench_scale())


@pytest.mark.parametrize("case", cases(harness.bench_scale()), ids=lambda case: case.name)
def test_replay(benchmark, stream, case):
    benchmark.pedantic(run(case, stream), rounds=1)
    benchmark.extra_info["examples"] = case.examples
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["examples_per_s"] = case.examples / benchmark.stats.stats.median


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=harness.bench_scale(), help="multiplies every count")
    parser.add_argument("--repeats", type=int, default=1, help="runs per row (median)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    stream, stream_examples = make_stream(args.scale), scaled(1_000_000, args.scale)
    timed = [(case, harness.time_ms(run(case, stream), args.repeats, warmup=0)) for case in cases(args.scale)]
    rates = [(case, case.examples / (ms * 1e-3), ms) for case, ms in timed]
    per_example = {case.policy: rate for case, rate, _ in rates if case.implementation == "per_example"}
    rows = []
    for case, rate, ms in rates:
        ratio = f"{rate / per_example[case.policy]:.1f}x" if case.compared else "-"
        examples = f"{'first ' if case.examples < stream_examples else ''}{case.examples:,}"
        row = [case.policy, case.implementation, f"{case.capacity:,}", examples, f"{ms * 1e-3:.2f}", f"{rate:,.0f}"]
        rows.append([*row, ratio])
    print(
        f"ReplayBuffer add ({BATCH} examples of {PIXELS} fp32 pixels + an int64 label) + sample({SAMPLE}), "
        f"{torch.get_num_threads()} threads"
    )
    harness.print_table(["policy", "implementation", "capacity", "examples", "s", "examples/s", "vs per-example"], rows)


if __name__ == "__main__":
    main()

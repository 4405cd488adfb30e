"""The demo's settings: one protocol for every strategy (same model, optimizer, learning rate, epochs, batches)."""

from dataclasses import asdict, dataclass, field

import torch

from fastforget.demo.lm import LM_STRATEGIES, LMConfig

__all__ = ["DemoConfig", "LM_STRATEGIES", "LMConfig", "STRATEGIES"]

STRATEGIES = ("finetune", "ewc", "online-ewc", "replay", "lora", "protect", "combined")  # of the digits benchmarks
DEFAULT_LR = {"adam": 1e-3, "sgd": 0.1}
# about 320-400 Adam steps of 32 examples per task on either benchmark (split-digits has ~250 training examples
# per task, permuted-digits ~1,260): the order of Hsu et al. 2018's 4 epochs of 12,000 MNIST digits at batch 128
DEFAULT_EPOCHS = {"split": 40, "permuted": 10}


@dataclass
class DemoConfig:
    benchmarks: tuple = ("split", "permuted")  # and/or "lm" (fastforget/demo/lm.py)
    strategies: tuple | None = None  # None: every strategy of each benchmark; else those of them in this list
    epochs: int | None = None  # per task; None: DEFAULT_EPOCHS of the benchmark
    seeds: int = 1  # run seeds 0 .. seeds - 1
    out: str = "demo_out"
    backend: str = "auto"  # of every fused op (EWC, protector, LoRA); the overhead probe adds "reference"
    device: str = field(default_factory=lambda: "cuda" if torch.cuda.is_available() else "cpu")
    optimizer: str = "adam"  # Hsu et al. 2018's optimizer for every method; a fresh one per task
    lr: float | None = None  # None: DEFAULT_LR[optimizer]
    batch_size: int = 32
    hidden: int = 128  # the MLP 64 -> hidden -> hidden -> 10
    ewc_lambda: float = 100.0  # penalty lam * sum F (theta - theta*)^2 (no 1/2), F the empirical Fisher
    online_decay: float = 1.0  # online EWC's gamma (van de Ven & Tolias 2019 use 1)
    replay_capacity: int = 200  # examples (reservoir sampling over the stream of all tasks)
    lora_rank: int = 8  # adapters of the lora strategy, on every linear layer after the first task
    lora_alpha: float = 16
    probe_steps: int = 30  # timed steps per backend in the overhead probe (after 5 warm-up steps)
    threads: int | None = None  # torch CPU threads; None: 1 for digits (a 64-128-128-10 MLP gains nothing from
    # more, and on a busy machine every small parallel op can wait milliseconds for a second core: 16x slower steps
    # measured on 2 shared cores), every core for the LM
    progress: bool = True
    lm: LMConfig = field(default_factory=LMConfig)

    @property
    def learning_rate(self):
        return DEFAULT_LR[self.optimizer] if self.lr is None else self.lr

    def strategies_for(self, benchmark):
        """The strategies run on `benchmark`, in the benchmark's order."""
        known = LM_STRATEGIES if benchmark == "lm" else STRATEGIES
        return known if self.strategies is None else tuple(s for s in known if s in self.strategies)

    def epochs_for(self, benchmark):
        return DEFAULT_EPOCHS[benchmark] if self.epochs is None else self.epochs

    def to_dict(self):
        return asdict(self) | {"learning_rate": self.learning_rate}

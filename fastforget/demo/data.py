"""The demo's benchmarks, built from scikit-learn's bundled 8x8 digits (1,797 images, no download).

* ``split``: five tasks of two classes, (0, 1), (2, 3), ..., (8, 9), in two scenarios (van de Ven & Tolias 2019;
  Hsu et al. 2018): ``task-IL`` (the task is known at test time: the model answers among the task's two classes,
  trained and evaluated as a multi-head network) and ``class-IL`` (one head over all ten classes, no task label).
* ``permuted``: five tasks of all ten classes, each with its own fixed random permutation of the 64 pixels;
  ``domain-IL`` (one ten-way head, no task label).

One stratified train/test split (70/30, fixed: the same for every run seed); features standardised with the
training set's per-pixel mean and standard deviation (pixels that are constant there are left centred only).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

CLASSES = 10
SPLIT_TASKS = 5
DATA_SEED = 0  # the train/test split and the permutations; run seeds vary initialisation and batch order


@dataclass
class Task:
    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


@dataclass
class Scenario:
    """A benchmark in one scenario: its tasks, and whether answers are restricted to the target's task."""

    benchmark: str  # "split" or "permuted"
    name: str  # "split/task-IL", "split/class-IL", "permuted/domain-IL"
    tasks: list[Task]
    task_heads: bool  # task-IL: the network has one 2-way head per task (a slice of the 10 outputs)

    def loss(self, logits, targets):
        """Cross-entropy over all classes, or (task-IL) over the two classes of each example's task."""
        if not self.task_heads:
            return F.cross_entropy(logits, targets)
        first = targets - targets % 2  # the task of a split-digits class c is c // 2; its classes first, first + 1
        head = logits.gather(-1, torch.stack([first, first + 1], -1))
        return F.cross_entropy(head, targets - first)

    def predict(self, logits, targets):
        """The predicted class: argmax over all classes, or (task-IL) over the two of the target's task."""
        if not self.task_heads:
            return logits.argmax(-1)
        first = targets - targets % 2
        return first + logits.gather(-1, torch.stack([first, first + 1], -1)).argmax(-1)


def _digits(device):
    """(train_x, train_y, test_x, test_y): standardised float32 features, int64 labels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    train_x, test_x, train_y, test_y = train_test_split(x, y, test_size=0.3, stratify=y, random_state=DATA_SEED)
    train_x, test_x = torch.tensor(train_x, dtype=torch.float32), torch.tensor(test_x, dtype=torch.float32)
    mean, std = train_x.mean(0), train_x.std(0)
    std = torch.where(std > 0, std, 1.0)
    return tuple(
        t.to(device)
        for t in ((train_x - mean) / std, torch.tensor(train_y), (test_x - mean) / std, torch.tensor(test_y))
    )


def split_digits(device, task_heads):
    train_x, train_y, test_x, test_y = _digits(device)
    tasks = []
    for t in range(SPLIT_TASKS):
        classes = torch.tensor([2 * t, 2 * t + 1], device=device)
        train, test = torch.isin(train_y, classes), torch.isin(test_y, classes)
        tasks.append(Task(f"{2 * t}/{2 * t + 1}", train_x[train], train_y[train], test_x[test], test_y[test]))
    return Scenario("split", "split/task-IL" if task_heads else "split/class-IL", tasks, task_heads)


def permuted_digits(device, num_tasks=5):
    train_x, train_y, test_x, test_y = _digits(device)
    generator = torch.Generator().manual_seed(DATA_SEED)
    tasks = []
    for t in range(num_tasks):
        perm = torch.randperm(train_x.shape[1], generator=generator).to(device)
        tasks.append(Task(f"perm {t + 1}", train_x[:, perm], train_y, test_x[:, perm], test_y))
    return Scenario("permuted", "permuted/domain-IL", tasks, task_heads=False)


BENCHMARKS = {
    "split": lambda device: [split_digits(device, task_heads=True), split_digits(device, task_heads=False)],
    "permuted": lambda device: [permuted_digits(device)],
}

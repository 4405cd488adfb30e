"""The LM benchmark's corpora, shipped with Python itself (no download), as byte-level token sequences.

* corpus A, the old skill: English prose, Python's help topics (``pydoc_data.topics``, ~470 KB, the text
  ``help("for")`` prints);
* corpus B, the new domain: Python source code, the running interpreter's standard library (its top-level
  ``*.py`` modules, ~4.7 MB on CPython 3.11; the exact files depend on the interpreter, recorded in results.json).

Tokens are UTF-8 bytes (vocabulary 256): nothing to train, cache or version, and both corpora are measured in the
same unit (nats per byte) -- a BPE fitted to either corpus would make the two cross-entropies incomparable. At this
model size the 256-row embedding (tied to the head) is ~3 % of the parameters.

Splits are by document and fixed: every ``HELD_OUT_EVERY``-th document (topics, or modules, in sorted order) is
held out; the rest is the training text. Each split is one byte stream (documents joined by blank lines) cut into
non-overlapping sequences of ``seq_len`` tokens.
"""

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

HELD_OUT_EVERY = 10
VOCAB = 256


def corpus_a():
    """The help topics: {topic: text}."""
    from pydoc_data.topics import topics

    return dict(topics)


def corpus_b():
    """The standard library's top-level modules: {file name: source}."""
    folder = Path(sysconfig.get_paths()["stdlib"])
    return {path.name: path.read_text(encoding="utf-8", errors="replace") for path in sorted(folder.glob("*.py"))}


def split(documents):
    """(train text, held-out text): every HELD_OUT_EVERY-th document in sorted order is held out."""
    names = sorted(documents)
    held_out = {name for i, name in enumerate(names) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1}
    join = "\n\n".join
    return join(documents[n] for n in names if n not in held_out), join(documents[n] for n in names if n in held_out)


def sequences(text, seq_len):
    """(n, seq_len) int64 token ids: the text's UTF-8 bytes, cut into non-overlapping sequences (the tail dropped)."""
    data = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8)
    n = len(data) // seq_len
    return data[: n * seq_len].view(n, seq_len).long()


class TokenDataset(torch.utils.data.Dataset):
    """Rows of a (n, seq_len) id tensor as Hugging Face causal-LM examples (labels = input_ids; the model shifts)."""

    def __init__(self, ids):
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


@dataclass
class Corpus:
    name: str
    train: torch.Tensor  # (n, seq_len) int64
    held_out: torch.Tensor
    digest: str  # of the text: the pre-training cache key

    def describe(self):
        return {"name": self.name, "train_sequences": len(self.train), "held_out_sequences": len(self.held_out),
                "sha256": self.digest}  # fmt: skip


def load(seq_len):
    """(A, B): the two corpora as Corpus objects."""
    out = []
    for name, documents in (("pydoc topics", corpus_a()), ("stdlib source", corpus_b())):
        train, held_out = split(documents)
        digest = hashlib.sha256((train + "\0" + held_out).encode("utf-8")).hexdigest()
        out.append(Corpus(name, sequences(train, seq_len), sequences(held_out, seq_len), digest))
    return tuple(out)

"""Per-sample Fisher from per-layer hooks on the ordinary backward (fastforget.fisher.layers), against brute-force
loops of one autograd backward per sequence: plain and PEFT LLaMA models (gradient checkpointing on,
enable_input_require_grads), fastforget's LoRA, tied embeddings, classifiers, for `empirical`, `true` and `mas`.
Every test also checks which engine ran: the hooks, or torch.func where they cannot apply."""

import pytest
import torch
import torch.nn.functional as F

import fastforget as ff
from fastforget.fisher import functional

transformers = pytest.importorskip("transformers")

VOCAB = 61
RTOL = 1e-4  # fp32 gradients summed in another order (the reference is fp32 autograd too)


def hf_loss(model, batch):
    return model(**batch).loss


def llama(tie=False):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=64, tie_word_embeddings=tie,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def peft_llama():
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"], init_lora_weights=False
    )
    model = peft.get_peft_model(llama(), config)
    model.gradient_checkpointing_enable()
    model.enable_input_require_grads()  # what TRL does for a PEFT model
    return model


def ff_lora_llama():
    model = llama()
    for p in model.parameters():
        p.requires_grad_(False)
    ff.apply_lora(model, ("q_proj", "up_proj"), r=4)
    for module in [m for m in model.modules() if isinstance(m, ff.LoRALinear)]:
        # B starts at zero: give it values so that A has a gradient
        torch.nn.init.normal_(module.lora_B, std=0.1)
    return model


def token_batches(sizes=((3, 9), (2, 7)), seed=0):
    """Right-padded batches (attention_mask 0 and labels -100 on the padding, an unlabelled prompt), one sequence
    with no counted label (no sample)."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for b, t in sizes:
        ids = torch.randint(0, VOCAB, (b, t), generator=g)
        mask = torch.ones_like(ids)
        mask[0, t - 3 :] = 0
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :2] = -100
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    batches[0]["labels"][1] = -100
    return batches


def sequences(batches, counted_only=True):
    for batch in batches:
        for i in range(len(batch["input_ids"])):
            unit = {k: v[i : i + 1] for k, v in batch.items()}
            if not counted_only or (unit["labels"][:, 1:] != -100).any():
                yield unit


def brute_force(model, units, value, absolute=False):
    """Mean over units of g^2 (|g|), g the gradient of value(model, unit), one backward each, in fp64."""
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    total, count = [torch.zeros_like(p, dtype=torch.float64) for p in params], 0
    for unit in units:
        grads = torch.autograd.grad(value(model, unit), params, allow_unused=True)
        for t, g in zip(total, grads):
            if g is not None:
                t += g.double().abs() if absolute else g.double().square()
        count += 1
    return [t / count for t in total]


def output_norm(model, unit):
    logits = model(input_ids=unit["input_ids"], attention_mask=unit["attention_mask"]).logits.float()
    mask = unit["attention_mask"].float()
    return (logits.square().sum(-1) * mask).sum() / mask.sum()


@pytest.fixture
def torch_func_calls(monkeypatch):
    """How many chunks went through torch.func (0: the layer hooks did everything)."""
    calls = []
    original = functional.FunctionalGradients.add

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(functional.FunctionalGradients, "add", counting)
    return calls


def assert_close(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), w, rtol=RTOL, atol=RTOL * float(w.abs().max()) + 1e-12)


MODELS = {"plain": llama, "peft-checkpointing": peft_llama, "ff-lora": ff_lora_llama, "tied": lambda: llama(tie=True)}


@pytest.mark.parametrize("make", MODELS.values(), ids=MODELS.keys())
def test_empirical_and_mas_equal_a_per_sequence_loop(make, torch_func_calls):
    model, batches = make(), token_batches()
    grads_before = [p.grad for p in model.parameters()]
    trainable = [p.requires_grad for p in model.parameters()]
    assert_close(
        ff.estimate_fisher(model, batches, batch_loss=hf_loss), brute_force(model, sequences(batches), hf_loss)
    )
    unlabelled = [{k: v for k, v in b.items() if k != "labels"} for b in batches]
    got = ff.estimate_fisher(model, unlabelled, estimator="mas")
    assert_close(got, brute_force(model, sequences(batches, counted_only=False), output_norm, absolute=True))
    assert torch_func_calls == []
    assert [p.grad for p in model.parameters()] == grads_before
    assert [p.requires_grad for p in model.parameters()] == trainable


@pytest.mark.parametrize("make", [llama, peft_llama], ids=["plain", "peft-checkpointing"])
@pytest.mark.parametrize("samples", [1, 2])
def test_true_fisher_of_a_language_model_equals_a_loop_over_the_same_draws(make, samples, torch_func_calls):
    model, batches = make(), token_batches()
    got = ff.estimate_fisher(
        model,
        batches,
        batch_loss=hf_loss,
        estimator="true",
        samples=samples,
        generator=torch.Generator().manual_seed(3),
    )
    generator, units = torch.Generator().manual_seed(3), []
    model.eval()
    for batch in batches:  # the draws: per batch of counted sequences, `samples` labels per counted position
        keep = (batch["labels"][:, 1:] != -100).any(1)
        batch = {k: v[keep] for k, v in batch.items()}
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        probs, counted = torch.softmax(logits[:, :-1].float(), -1), batch["labels"][:, 1:] != -100
        for _ in range(samples):
            drawn = torch.multinomial(probs.flatten(0, 1), 1, generator=generator).view(counted.shape)
            labels = torch.full_like(batch["labels"], -100)
            labels[:, 1:] = torch.where(counted, drawn, -100)
            units += sequences([{**batch, "labels": labels}])
    want = brute_force(model, units, hf_loss)  # the mean over sequences x draws
    assert_close(got, want)
    assert torch_func_calls == []


class Classifier(torch.nn.Module):
    """Embedding (with a padding index) -> mean -> LayerNorm -> Linear -> Tanh -> Linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.embed = torch.nn.Embedding(20, 6, padding_idx=0)
        self.norm = torch.nn.LayerNorm(6)
        self.hidden, self.out = torch.nn.Linear(6, 7), torch.nn.Linear(7, 3)

    def forward(self, ids):
        return self.out(torch.tanh(self.hidden(self.norm(self.embed(ids).mean(1)))))


def test_classifier_pairs_with_an_embedding_and_a_norm(torch_func_calls):
    """(inputs, targets) pairs with loss_fn: per-example loss_fn values; the true Fisher's exact expectation over
    the classes (weights p(c|x)); the padding row of the embedding gets nothing."""
    model = Classifier()
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randint(0, 20, (5, 4), generator=g), torch.randint(0, 3, (5,), generator=g)) for _ in range(2)]
    units = [(x[i : i + 1], y[i : i + 1]) for x, y in batches for i in range(len(y))]
    got = ff.estimate_fisher(model, batches, F.cross_entropy)
    assert_close(got, brute_force(model, units, lambda m, u: F.cross_entropy(m(u[0]), u[1])))
    assert got[0][0].abs().max() == 0  # padding_idx
    got = ff.estimate_fisher(model, batches, F.cross_entropy, estimator="true")
    want = [0.0 for _ in got]
    for c in range(3):
        for x, _ in units:
            prob = torch.softmax(model(x), -1)[0, c].detach().double()
            (grads,) = [brute_force(model, [(x, torch.tensor([c]))], lambda m, u: F.cross_entropy(m(u[0]), u[1]))]
            want = [w + prob * gc for w, gc in zip(want, grads)]
    assert_close(got, [w / len(units) for w in want])
    assert torch_func_calls == []


def test_where_the_hooks_cannot_apply_torch_func_gives_the_same_fisher(torch_func_calls):
    """GPT-2's position embedding sees one (1, seq) row for the whole batch; a batch_loss that is not the model's own
    loss; both fall back to torch.func with the same result as a loop."""
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB))
    batches = [{**b, "attention_mask": torch.ones_like(b["attention_mask"])} for b in token_batches()]
    assert_close(ff.estimate_fisher(gpt2, batches, batch_loss=hf_loss), brute_force(gpt2, sequences(batches), hf_loss))
    assert torch_func_calls
    torch_func_calls.clear()
    model = llama()

    def doubled(m, b):
        return 2 * m(**b).loss

    assert_close(
        ff.estimate_fisher(model, batches, batch_loss=doubled), brute_force(model, sequences(batches), doubled)
    )
    assert torch_func_calls


def test_a_tied_weight_sums_its_modules_per_sample_before_squaring(torch_func_calls):
    model = llama(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    batches = token_batches()
    got = ff.estimate_fisher(model, batches, batch_loss=hf_loss)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    want = brute_force(model, sequences(batches), hf_loss)
    index = names.index("model.embed_tokens.weight")
    assert_close([got[index]], [want[index]])
    assert torch_func_calls == []

"""Fisher estimation and EWC on language models with Hugging Face token batches (dicts and BatchEncoding), against
brute-force per-sequence loops: padding, labels of -100, LLaMA (GQA) and GPT-2 built from small configs."""

import pytest
import torch

import fastforget as ff

transformers = pytest.importorskip("transformers")

VOCAB = 61


def hf_loss(model, batch):
    return model(**batch).loss


def llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=64, attn_implementation="sdpa",
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64)
    return transformers.GPT2LMHeadModel(config)


def token_batches(seed=0, sizes=((3, 9), (2, 9))):
    """Right-padded batches: attention_mask 0 and labels -100 on the padding, some prompt tokens also -100."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for b, t in sizes:
        ids = torch.randint(0, VOCAB, (b, t), generator=g)
        mask = torch.ones_like(ids)
        mask[0, t - 3 :] = 0  # the first sequence is padded
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :2] = -100  # an unlabelled prompt
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def squared_grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return [g.double() ** 2 for g in torch.autograd.grad(loss, params, allow_unused=False)]


def brute_force(model, batches, per_sample):
    """Mean over sequences (or batches) of g^2, one backward each."""
    model.eval()
    total, count = None, 0
    for batch in batches:
        units = [{k: v[i : i + 1] for k, v in batch.items()} for i in range(len(batch["input_ids"]))]
        for unit in units if per_sample else [batch]:
            sq = squared_grads(model, model(**unit).loss)
            total = sq if total is None else [a + b for a, b in zip(total, sq)]
            count += 1
    return [t / count for t in total]


def unpadded(batches):
    return [{**b, "attention_mask": torch.ones_like(b["attention_mask"])} for b in batches]


@pytest.mark.parametrize("make_model", [llama, gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize(
    ("estimator", "chunk_size", "padded"),
    [("empirical", 2, False), ("empirical", 2, True), ("empirical", 1, False), ("batch", None, True)],
    ids=["empirical-vmap", "empirical-padded", "empirical-loop", "batch-padded"],
)
def test_token_batch_estimators_match_brute_force(make_model, estimator, chunk_size, padded):
    """Per-sequence gradients vmapped (unpadded), looped (padded chunks, and chunk_size=1), and the batch
    estimator."""
    model, batches = make_model(), token_batches()
    batches = batches if padded else unpadded(batches)
    got = ff.estimate_fisher(model, batches, batch_loss=hf_loss, estimator=estimator, chunk_size=chunk_size)
    want = brute_force(model, batches, per_sample=estimator == "empirical")
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-10)


def test_batch_encoding_and_sequences_without_labels():
    """A tokenizer's BatchEncoding works like a dict; a sequence whose labels are all -100 is no sample."""
    model, batches = llama(), token_batches()
    batches[0]["labels"][1] = -100
    encoded = [transformers.BatchEncoding(b) for b in batches]
    got = ff.estimate_fisher(model, encoded, batch_loss=hf_loss, chunk_size=1)
    kept = [{k: v[[0, 2]] for k, v in batches[0].items()}, batches[1]]
    for g, w in zip(got, brute_force(model, kept, per_sample=True)):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-10)


@pytest.mark.parametrize("samples", [1, 3])
def test_true_fisher_of_a_language_model_matches_the_same_draws(samples):
    """Labels drawn from p(. | x_<t) at every counted position (the label at t from the logits at t - 1)."""
    model, batches = llama(), token_batches(sizes=((3, 9),))
    got = ff.estimate_fisher(
        model, batches, batch_loss=hf_loss, estimator="true", samples=samples, chunk_size=3,
        generator=torch.Generator().manual_seed(7),
    )  # fmt: skip
    generator, batch = torch.Generator().manual_seed(7), batches[0]
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    probs = torch.softmax(logits[:, :-1].float(), -1)
    counted = batch["labels"][:, 1:] != -100
    total = None
    for _ in range(samples):
        drawn = torch.multinomial(probs.flatten(0, 1), 1, generator=generator).view(counted.shape)
        labels = torch.full_like(batch["labels"], -100)
        labels[:, 1:] = torch.where(counted, drawn, -100)
        for i in range(3):
            unit = {"input_ids": batch["input_ids"][i : i + 1], "attention_mask": batch["attention_mask"][i : i + 1]}
            sq = squared_grads(model, model(**unit, labels=labels[i : i + 1]).loss)
            total = sq if total is None else [a + b for a, b in zip(total, sq)]
    for g, w in zip(got, total):
        torch.testing.assert_close(g.double(), w / (3 * samples), rtol=1e-4, atol=1e-10)


def test_ewc_and_protected_trainer_consolidate_on_token_batches():
    model, batches = llama(), token_batches()
    ewc = ff.EWC(model, lam=10.0)
    ewc.consolidate(batches, batch_loss=hf_loss, progress=False, chunk_size=1)
    want = ff.estimate_fisher(model, batches, batch_loss=hf_loss, chunk_size=1)
    assert all(torch.equal(f, w) for f, w in zip(ewc.state_dict()["fisher"], want))
    trained = ff.EWC(model, lam=10.0)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    trainer = ff.ProtectedTrainer(model, opt, ewc=trained, batch_loss=hf_loss, replay=ff.ReplayBuffer(8))
    stats = trainer.step(batches[0])
    assert stats["penalty"] == 0.0 and stats["loss"] > 0
    trainer.end_task(unpadded(batches))
    assert len(trainer.replay) == 5 and float(trained.penalty()) == 0.0  # at the anchor
    assert trainer.step(batches[1])["penalty"] == 0.0


def test_a_model_that_cannot_be_vmapped_falls_back_to_a_loop():
    """vmap refuses data-dependent control flow: the per-sample gradients come from one backward per sequence
    (after one warning), the same Fisher; no advice the caller cannot follow (end_task takes no chunk_size)."""

    def batch_loss(model, batch):
        if batch["input_ids"].sum() > 0:  # data-dependent control flow: vmap refuses it
            return model(**batch).loss
        return model(**batch).loss * 2

    model, batches = llama(), unpadded(token_batches())
    with pytest.warns(UserWarning, match="one backward per sample instead"):
        got = ff.estimate_fisher(model, batches, batch_loss=batch_loss, chunk_size=2)
    for g, w in zip(got, brute_force(model, batches, per_sample=True)):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-10)


def test_bad_token_batches_change_nothing():
    model, batches = llama(), token_batches()
    ewc = ff.EWC(model)
    before = ewc.state_dict()
    unlabelled = [{k: v for k, v in b.items() if k != "labels"} for b in batches]
    with pytest.raises(ValueError, match="loss is None .* without 'labels'"):
        ewc.consolidate(unlabelled, batch_loss=hf_loss, progress=False, chunk_size=1)
    with pytest.raises(ValueError, match="must be a 0-dim floating-point tensor"):
        ewc.consolidate(batches, batch_loss=lambda m, b: m(**b).logits.sum(-1), progress=False, chunk_size=1)
    with pytest.raises(ValueError, match="must be a 0-dim floating-point tensor"):
        ewc.consolidate(batches, batch_loss=lambda m, b: m(**b).logits.sum(-1), estimator="batch", progress=False)
    ignored = [{**b, "labels": torch.full_like(b["labels"], -100)} for b in batches]
    with pytest.raises(ValueError, match="no sample of the loader had a counted label"):
        ewc.consolidate(ignored, batch_loss=hf_loss, progress=False, chunk_size=1)
    with pytest.raises(ValueError, match="loader yielded no batches"):
        ewc.consolidate([], batch_loss=hf_loss, progress=False)
    with pytest.raises(ValueError, match="exactly one of loss_fn"):
        ewc.consolidate(batches, progress=False)
    with pytest.raises(TypeError, match="not an \\(inputs, targets\\) pair; .* pass batch_loss"):
        ewc.consolidate(batches, torch.nn.functional.cross_entropy, progress=False)
    after = ewc.state_dict()
    assert after.keys() == before.keys() and after["tasks"] == before["tasks"] == 0


def output_norm_grads(model, unit):
    """|d ||f(x)||^2 / d theta| for one sequence, f = its logits, the norm averaged over its unmasked positions."""
    logits = model(input_ids=unit["input_ids"], attention_mask=unit["attention_mask"]).logits.float()
    mask = unit["attention_mask"].float()
    value = (logits.square().sum(-1) * mask).sum() / mask.sum()
    params = [p for p in model.parameters() if p.requires_grad]
    return [g.double().abs() for g in torch.autograd.grad(value, params)]


@pytest.mark.parametrize("chunk_size", [2, 1], ids=["vmap", "loop"])
def test_mas_importance_matches_brute_force_without_labels(chunk_size):
    """MAS (Aljundi et al. 2018) on unlabelled text: the mean over sequences of |d ||f(x)||^2 / d theta|."""
    model = llama()
    batches = [{k: v for k, v in b.items() if k != "labels"} for b in token_batches()]
    if chunk_size == 2:
        batches = [{**b, "attention_mask": torch.ones_like(b["attention_mask"])} for b in batches]
    got = ff.estimate_fisher(model, batches, estimator="mas", chunk_size=chunk_size)
    model.eval()
    total, count = None, 0
    for batch in batches:
        for i in range(len(batch["input_ids"])):
            grads = output_norm_grads(model, {k: v[i : i + 1] for k, v in batch.items()})
            total = grads if total is None else [a + b for a, b in zip(total, grads)]
            count += 1
    for g, w in zip(got, total):
        torch.testing.assert_close(g.double(), w / count, rtol=1e-4, atol=1e-9)
    ewc = ff.EWC(model, lam=1.0)
    ewc.consolidate(batches, estimator="mas", chunk_size=chunk_size, progress=False)  # no loss, no labels
    assert ewc.tasks == 1

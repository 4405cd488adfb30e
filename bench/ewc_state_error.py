"""The error each EWC state format adds to the penalty, on the LM demo (``fastforget.demo.lm``'s defaults).

Pre-train (the demo's cached model), estimate the empirical Fisher of corpus A on the demo's Fisher sequences,
fine-tune on corpus B with AdamW at the demo's learning rate, and evaluate lam * sum F (theta - theta*)^2 and its
gradient at the fine-tuned weights for each state format against fp32 anchors and Fisher (the fp64 sum of the fp32
state is the reference). Run: ``python bench/ewc_state_error.py [--seeds 2] [--pretrain-steps 600]``; prints a
markdown table.
"""

import argparse

import torch

import fastforget as ff
from fastforget.demo import lm, lm_data

FORMATS = {  # label -> EWC keywords
    "fp32 anchor + fp32 Fisher (reference)": dict(),
    "bf16 anchor + bf16 Fisher (`state_dtype=torch.bfloat16`)": dict(state_dtype=torch.bfloat16),
    "fp32 anchor + 8-bit Fisher (`fisher_bits=8, state_dtype=torch.float32`)": dict(
        fisher_bits=8, state_dtype=torch.float32
    ),
    "bf16 anchor + 8-bit Fisher (`fisher_bits=8`)": dict(fisher_bits=8),
}


def batch_loss(model, batch):
    return model(input_ids=batch, labels=batch).loss


def penalty_and_grads(ewc, model):
    model.zero_grad(set_to_none=True)
    value = ewc.apply_()
    return float(value), torch.cat([p.grad.flatten() for p in model.parameters()])


def measure(config, data, seed, checkpoints):
    state, *_ = lm.pretrain(config, data, seed, "cpu")
    model = lm.pretrained_model(state, config, seed, "cpu")
    a_train, stages = lm.finetune_sets(config, data, seed)
    fisher_ids = a_train.ids[: config.fisher_sequences]  # the demo's Fisher sequences of A
    reference = ff.EWC(model, lam=config.ewc_lambda, mode="separate")
    reference.consolidate(list(fisher_ids.split(config.batch_size)), batch_loss=batch_loss, progress=False)
    saved = reference.state_dict()
    formats = {}
    for label, kw in FORMATS.items():
        ewc = ff.EWC(model, lam=config.ewc_lambda, mode="separate", **kw)
        ewc.load_state_dict(saved)
        formats[label] = ewc
    b_ids = torch.cat([stage.ids for stage in stages])
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr)
    rows = []
    for step, batch in enumerate(b_ids.split(config.batch_size)[: config.steps], start=1):
        opt.zero_grad()
        batch_loss(model, batch).backward()
        opt.step()
        if step in checkpoints:
            exact = config.ewc_lambda * sum(
                (f.double() * (p.detach().double() - a.double()).square()).sum()
                for p, a, f in zip(model.parameters(), reference.anchors, reference.fisher)
            )
            _, grad_ref = penalty_and_grads(reference, model)
            for label, ewc in formats.items():
                value, grad = penalty_and_grads(ewc, model)
                grad_error = float((grad - grad_ref).norm() / grad_ref.norm())
                rows.append((seed, step, label, value, float(value / exact - 1), grad_error))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--pretrain-steps", type=int, default=lm.LMConfig.pretrain_steps)
    parser.add_argument("--cache", default=None, help="pre-trained models' folder (default: the demo's cache)")
    args = parser.parse_args()
    config = lm.LMConfig(pretrain_steps=args.pretrain_steps, cache=args.cache)
    data = lm_data.load(config.seq_len)
    checkpoints = (1, config.steps)
    rows = [row for seed in range(args.seeds) for row in measure(config, data, seed, checkpoints)]
    print("| seed | fine-tuning steps | state | penalty | penalty rel. error | gradient rel. error |")
    print("|---|---:|---|---:|---:|---:|")
    for seed, step, label, value, error, grad_error in rows:
        print(f"| {seed} | {step} | {label} | {value:.4g} | {error:+.2e} | {grad_error:.2e} |")


if __name__ == "__main__":
    main()

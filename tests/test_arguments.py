"""ProtectionArguments: read by HfArgumentParser beside TrainingArguments / SFTConfig from argv, JSON and YAML; bad
values refused at parse time, naming the field; build(model) makes the defences ProtectionMixin takes."""

import json

import pytest
import torch
import transformers

import fastforget as ff
from fastforget.arguments import ProtectionArguments

ARGV = [
    "--output_dir", "out", "--learning_rate", "3e-4",
    "--ewc_lambda", "500", "--ewc_mode", "online", "--ewc_decay", "0.9", "--ewc_estimator", "true",
    "--ewc_max_batches", "8", "--ewc_state_dtype", "bfloat16",
    "--replay_capacity", "1000", "--replay_policy", "random_replace", "--replay_weight", "0.5",
    "--replay_batch_size", "4", "--replay_seed", "3",
    "--protect", "element", "--protect_window", "50", "--protect_threshold", "0.2",
    "--kl_to_base", "0.25", "--kl_backend", "reference",
    "--forgetting_interval", "10", "--forgetting_max_batches", "4", "--no_forgetting_plot",
]  # fmt: skip
SETTINGS = {
    "ewc_lambda": 500.0, "ewc_mode": "online", "ewc_decay": 0.9, "ewc_estimator": "true", "ewc_max_batches": 8,
    "ewc_state_dtype": "bfloat16", "replay_capacity": 1000, "replay_policy": "random_replace", "replay_weight": 0.5,
    "replay_batch_size": 4, "replay_seed": 3, "protect": "element", "protect_window": 50, "protect_threshold": 0.2,
    "kl_to_base": 0.25, "kl_backend": "reference", "forgetting_interval": 10, "forgetting_max_batches": 4,
    "forgetting_plot": False,
}  # fmt: skip


def parser(*others):
    return transformers.HfArgumentParser((transformers.TrainingArguments, *others, ProtectionArguments))


def test_argv_json_and_yaml_give_the_same_arguments(tmp_path):
    yaml = pytest.importorskip("yaml")
    training, protection = parser().parse_args_into_dataclasses(args=ARGV)
    assert training.learning_rate == 3e-4 and training.output_dir == "out"
    assert protection == ProtectionArguments(**SETTINGS)
    everything = {"output_dir": "out", "learning_rate": 3e-4, **SETTINGS}
    (tmp_path / "run.json").write_text(json.dumps(everything))
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(everything))
    for parsed in (
        parser().parse_json_file(tmp_path / "run.json"),
        parser().parse_yaml_file(tmp_path / "run.yaml"),
    ):
        assert parsed[1] == protection
        assert parsed[0].learning_rate == 3e-4


def test_defaults_build_no_defence():
    (protection,) = transformers.HfArgumentParser(ProtectionArguments).parse_args_into_dataclasses(args=[])
    assert protection == ProtectionArguments()
    built = protection.build(torch.nn.Linear(3, 2))
    assert (built["ewc"], built["replay"], built["protector"], built["kl_to_base"]) == (None, None, None, None)


def test_beside_trl_sft_config(tmp_path):
    trl = pytest.importorskip("trl")
    config, protection = transformers.HfArgumentParser((trl.SFTConfig, ProtectionArguments)).parse_dict(
        {"output_dir": str(tmp_path), "use_cpu": True, "max_length": 64, "ewc_lambda": 10.0}
    )
    assert config.max_length == 64 and protection.ewc_lambda == 10.0


def test_build_makes_each_defence_with_its_settings():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    built = ProtectionArguments(**SETTINGS).build(model)
    ewc, replay, protector = built["ewc"], built["replay"], built["protector"]
    assert isinstance(ewc, ff.EWC)
    assert (ewc.lam, ewc.mode, ewc.decay, ewc.state_dtype) == (500.0, "online", 0.9, torch.bfloat16)
    assert isinstance(replay, ff.ReplayBuffer)
    assert (replay.capacity, replay.policy) == (1000, "random_replace")
    assert isinstance(protector, ff.GradientProtector)
    assert (protector.window, protector.threshold, protector.mode) == (50, 0.2, "element")
    assert [p.data_ptr() for p in ewc.params] == [p.data_ptr() for p in model.parameters()]
    assert built["replay_weight"] == 0.5 and built["replay_batch_size"] == 4
    assert built["ewc_estimator"] == "true" and built["ewc_max_batches"] == 8
    assert built["kl_to_base"] == 0.25 and built["kl_backend"] == "reference"
    # replay_seed: two builds sample the same examples
    samples = []
    for _ in range(2):
        buffer = ProtectionArguments(**SETTINGS).build(model)["replay"]
        buffer.add((torch.arange(20.0)[:, None], torch.arange(20)))
        samples.append(buffer.sample(5)[1])
    assert torch.equal(samples[0], samples[1])


def test_the_built_keywords_go_to_a_protected_trainer(tmp_path):
    """build(model) is what ProtectedHFTrainer takes; separate EWC and tensor protection this time."""
    from fastforget.transformers import ProtectedHFTrainer

    config = transformers.LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=40, max_position_embeddings=32,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    training, protection = parser().parse_args_into_dataclasses(
        args=["--output_dir", str(tmp_path), "--max_steps", "2", "--per_device_train_batch_size", "2",
              "--report_to", "none", "--use_cpu", "--save_strategy", "no", "--disable_tqdm", "true",
              "--ewc_lambda", "10", "--ewc_mode", "separate", "--replay_capacity", "16", "--protect", "tensor"]
    )  # fmt: skip
    data = [{"input_ids": list(range(1, 9))} for _ in range(4)]

    def collate(rows):
        ids = torch.tensor([r["input_ids"] for r in rows])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    trainer = ProtectedHFTrainer(
        model=model, args=training, train_dataset=data, data_collator=collate, **protection.build(model)
    )
    trainer.train()
    trainer.end_task()
    assert trainer.ewc.tasks == 1 and len(trainer.replay) == 4 and trainer.protector.mode == "tensor"
    callback = protection.forgetting_callback(trainer, {"old": data})
    assert (callback.interval, callback.max_batches, callback.plot) == (None, 16, True)


@pytest.mark.parametrize(
    "field, value, error, message",
    [
        ("ewc_lambda", -1.0, ValueError, "ewc_lambda must be >= 0"),
        ("ewc_lambda", float("nan"), ValueError, "ewc_lambda must be finite"),
        ("ewc_lambda", "big", TypeError, "ewc_lambda must be a real number"),
        ("ewc_mode", "offline", ValueError, "ewc_mode must be one of"),
        ("ewc_decay", -0.5, ValueError, "ewc_decay must be >= 0"),
        ("ewc_estimator", "fisher", ValueError, "ewc_estimator must be one of"),
        ("ewc_max_batches", 0, ValueError, "ewc_max_batches must be >= 1"),
        ("ewc_state_dtype", "float16", ValueError, "ewc_state_dtype must be one of"),
        ("replay_capacity", 0, ValueError, "replay_capacity must be >= 1"),
        ("replay_capacity", 2.5, TypeError, "replay_capacity must be an integer"),
        ("replay_policy", "diversity", ValueError, "replay_policy must be one of"),
        ("replay_weight", -1.0, ValueError, "replay_weight must be >= 0"),
        ("replay_batch_size", 0, ValueError, "replay_batch_size must be >= 1"),
        ("replay_seed", -1, ValueError, "replay_seed must be >= 0"),
        ("protect", "yes", ValueError, "protect must be one of"),
        ("protect_window", 0, ValueError, "protect_window must be >= 1"),
        ("protect_threshold", float("inf"), ValueError, "protect_threshold must be finite"),
        ("kl_to_base", -0.1, ValueError, "kl_to_base must be >= 0"),
        ("kl_backend", "gpu", ValueError, "kl_backend must be one of"),
        ("forgetting_interval", 0, ValueError, "forgetting_interval must be >= 1"),
        ("forgetting_max_batches", -2, ValueError, "forgetting_max_batches must be >= 1"),
        ("forgetting_plot", "yes", TypeError, r"forgetting_plot must be .*True or False"),
    ],
)
def test_bad_values_raise_naming_the_field(field, value, error, message):
    with pytest.raises(error, match=message):
        ProtectionArguments(**{field: value})
    with pytest.raises(error, match=message):  # from a JSON/YAML dict, as parse_json_file / parse_yaml_file read it
        parser().parse_dict({"output_dir": "out", field: value})


def test_bad_values_on_the_command_line_and_inconsistent_settings():
    with pytest.raises(ValueError, match="ewc_lambda must be >= 0"):
        parser().parse_args_into_dataclasses(args=["--output_dir", "out", "--ewc_lambda", "-3"])
    for bad in (["--protect_window", "ten"], ["--protect", "yes"], ["--ewc_mode", "offline"]):
        with pytest.raises(SystemExit):  # argparse's own type and choices checks, with its usage message
            parser().parse_args_into_dataclasses(args=["--output_dir", "out", *bad])
    with pytest.raises(ValueError, match="ewc_decay applies to ewc_mode='online'"):
        ProtectionArguments(ewc_lambda=1.0, ewc_mode="separate", ewc_decay=0.5)

"""run_glue.py with LoRA adapters (`--lora_r`, PEFT) on a tiny BERT: M-FAC learns through them, only the adapters,
the head and the never-trained pooler change, the window holds exactly the trainable parameters, bad values end
with one line before the weights load, and a resumed run ends where an uninterrupted one does."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

import run_glue
from mfac_glue import arguments as glue_arguments
from mfac_glue import data as glue_data

QUICK = ["--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "64", "--max_seq_length", "32",
         "--report_to", "none", "--disable_tqdm", "true", "--lora_r", "4", "--lora_alpha", "8"]


class EndOfTraining(TrainerCallback):
    """Keeps the model and the optimizer as training leaves them."""

    def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.model, self.optimizer = model, getattr(optimizer, "optimizer", optimizer)


def train(output: Path, model: Path, glue: Path, *extra: str, callbacks=None) -> dict:
    run_glue.main(["--model_name_or_path", str(model), "--task_name", "sst2",
                   "--train_file", str(glue / "SST-2" / "train.tsv"), "--validation_file", str(glue / "SST-2" / "dev.tsv"),
                   "--do_train", "--do_eval", "--output_dir", str(output), *QUICK, *extra], callbacks=callbacks)
    return json.loads((output / "all_results.json").read_text())


@pytest.mark.slow
def test_mfac_learns_through_adapters_and_changes_only_adapters_head_and_pooler(tmp_path, learnable_task):
    model, glue = learnable_task
    end = EndOfTraining()
    # Rank 8 on all three attention maps of the frozen random layer: the rule is the sentiment word's, which the
    # [CLS] position must learn to attend to.
    results = train(tmp_path / "out", model, glue, "--optim", "MFAC", "--optim_args",
                    '{"lr": 1e-2, "num_grads": 16, "damp": 1e-2}', "--lora_r", "8", "--lora_alpha", "32",
                    "--lora_target_modules", "query", "key", "value", "--num_train_epochs", "8", "--logging_steps", "25",
                    "--save_strategy", "no", callbacks=[end])
    labels = glue_data.read_glue_tsv(str(glue / "SST-2" / "dev.tsv"), "sst2")["label"]
    majority = max(np.bincount(labels)) / len(labels)
    losses = [entry["loss"] for entry in json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
              if "loss" in entry]
    assert len(losses) == 8  # 400 examples / batch 16 × 8 epochs, logged every 25 steps
    assert results["eval_accuracy"] >= majority + 0.2 and min(losses[-2:]) <= 0.8 * losses[0], (results, losses)

    # Every weight of the checkpoint that is not trained in full is bit-identical after training.
    initial = load_file(model / "model.safetensors")
    trained = {name: p for name, p in end.model.named_parameters()}
    frozen = {name: p for name, p in trained.items() if not p.requires_grad}
    assert all(".lora_" not in name and ".modules_to_save." not in name for name in frozen)
    for name, p in frozen.items():
        key = name.removeprefix("base_model.model.").replace(".base_layer", "").replace(".original_module", "")
        assert torch.equal(p, initial[key]), name
    moved = [name for name, p in trained.items() if p.requires_grad and not torch.equal(
        p, initial.get(name.removeprefix("base_model.model.").replace(".modules_to_save.default", ""), torch.zeros_like(p)))]
    assert any("lora_B" in name for name in moved) and any("pooler" in name for name in moved) and \
        any("classifier" in name for name in moved)

    # The window holds the trainable parameters exactly: no frozen weight, nothing row-sparse.
    trainable = sum(p.numel() for p in trained.values() if p.requires_grad)
    assert trainable == sum(p.numel() for name, p in trained.items()
                            if ".lora_" in name or ".modules_to_save." in name)
    assert end.optimizer.window_bytes() == trainable * 16 * 4
    assert results["optimizer_state_bytes"] == end.optimizer.memory_bytes()

    # The output folder holds the adapter as PEFT saves it, and the card says what trained.
    adapter = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert adapter["r"] == 8 and adapter["lora_alpha"] == 32 and "bert.pooler" in adapter["modules_to_save"]
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Adapters: LoRA" in card and "r = 8, lora_alpha = 32, lora_dropout = 0 on key, query, value" in card
    assert f"trained in full: bert.pooler, classifier. {trainable:,} of" in card and "## Optimizer: M-FAC" in card
    assert str(model) not in card  # a local base model is named by its record, not its path
    assert json.loads((tmp_path / "out" / "run_info.json").read_text())["adapters"]["lora_r"] == 8


def test_pooler_trains_only_when_the_checkpoint_never_trained_it(tmp_path, learnable_task, tiny_bert):
    from transformers import AutoModelForSequenceClassification, BertConfig

    from mfac_glue.adapters import lora_plan

    model, _ = learnable_task
    config = BertConfig.from_pretrained(model)
    arguments = glue_arguments.ModelArguments(model_name_or_path=str(model), lora_r=4)
    assert lora_plan(arguments, config, AutoModelForSequenceClassification).full_modules == ("bert.pooler",)
    trained = tmp_path / "trained"
    weights = AutoModelForSequenceClassification.from_pretrained(model)
    with torch.no_grad():
        weights.bert.pooler.dense.bias.add_(0.01)  # a pooler some training moved
    weights.save_pretrained(trained)
    for given, expected in (("auto", ()), ("true", ("bert.pooler",))):
        arguments = glue_arguments.ModelArguments(model_name_or_path=str(trained), lora_r=4, lora_train_pooler=given)
        assert lora_plan(arguments, config, AutoModelForSequenceClassification).full_modules == expected
    arguments = glue_arguments.ModelArguments(model_name_or_path=str(model), lora_r=4, lora_train_pooler="false")
    assert lora_plan(arguments, config, AutoModelForSequenceClassification).full_modules == ()


@pytest.mark.parametrize("extra,message", [
    (["--lora_r", "-1"], "--lora_r: must be ≥ 0 (0 trains the whole model), got -1"),
    (["--lora_r", "8", "--lora_alpha", "0"], "--lora_alpha: must be > 0, got 0.0"),
    (["--lora_r", "8", "--lora_dropout", "1"], "--lora_dropout: must be in [0, 1), got 1.0"),
    (["--lora_r", "8", "--lora_train_pooler", "maybe"], "--lora_train_pooler: must be one of auto, true, false"),
    (["--lora_r", "8", "--lora_target_modules", "query", "qkv"],
     "--lora_target_modules: 'qkv' names no module of this model; its layers are named classifier, dense, key,"),
])
def test_bad_lora_values_are_one_line_and_exit_2_before_the_weights_load(tmp_path, tiny_bert, glue_dir, extra,
                                                                         message, capsys):
    model = tmp_path / "model"
    model.mkdir()
    for name in ("config.json", "vocab.txt", "tokenizer_config.json"):
        (model / name).write_text((tiny_bert / name).read_text())
    (model / "model.safetensors").write_bytes(b"not a checkpoint: loading it would fail otherwise")
    argv = ["--model_name_or_path", str(model), "--task_name", "sst2", "--do_train", "--output_dir",
            str(tmp_path / "o"), "--train_file", str(glue_dir / "SST-2" / "train.tsv"), *extra]
    with pytest.raises(SystemExit) as exit_info:
        run_glue.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and message in err, err


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", [["--optim", "MFAC", "--optim_args", '{"num_grads": 4, "damp": 1e-4}'],
                                       ["--optim", "adamw_torch"]])
def test_a_resumed_lora_run_ends_with_the_same_adapter(tmp_path, learnable_task, optimizer):
    model, glue = learnable_task
    common = [*optimizer, "--learning_rate", "1e-3", "--max_steps", "6", "--max_train_samples", "96",
              "--max_eval_samples", "32", "--lora_dropout", "0.1"]  # dropout: the resumed run's RNG must match too
    train(tmp_path / "a", model, glue, *common, "--save_strategy", "steps", "--save_steps", "3")
    train(tmp_path / "b", model, glue, *common, "--save_strategy", "no",
          "--resume_from_checkpoint", str(tmp_path / "a" / "checkpoint-3"))
    straight = load_file(tmp_path / "a" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert straight.keys() == resumed.keys() and any("lora_A" in key for key in straight)
    assert all(torch.equal(straight[key], resumed[key]) for key in straight)
    assert not all(torch.equal(straight[key], load_file(tmp_path / "a" / "checkpoint-3" / "adapter_model.safetensors")[key])
                   for key in straight)  # the last three steps moved it


def test_plain_loop_on_a_peft_model_windows_only_what_trains(tiny_bert):
    # docs/usage.md's loop: MFAC over all of the PEFT model's parameters, as AdamW would be given them.
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from mfac_optim import MFAC

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForSequenceClassification.from_pretrained(tiny_bert),
                           LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"]))
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    optimizer = MFAC(model.parameters(), lr=1e-3, num_grads=4, damp=1e-4)
    generator = torch.Generator().manual_seed(1)
    for _ in range(6):  # wraps the window
        optimizer.zero_grad()
        tokens = torch.randint(0, model.config.vocab_size, (8, 12), generator=generator)
        model(input_ids=tokens, labels=torch.randint(0, 2, (8,), generator=generator)).loss.backward()
        optimizer.step()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert optimizer.window_bytes() == 4 * sum(p.numel() for p in trainable) * 4
    assert all(torch.equal(p, frozen[name]) for name, p in model.named_parameters() if not p.requires_grad)
    assert not torch.equal(model.base_model.model.classifier.modules_to_save["default"].weight,
                           model.base_model.model.classifier.original_module.weight)

    # The window holds what the saved state says; a parameter unfrozen since is refused, not silently left out.
    resumed = MFAC(model.parameters(), lr=1e-3, num_grads=4, damp=1e-4)
    resumed.load_state_dict(optimizer.state_dict())
    torch.testing.assert_close(resumed.stored_gradients(), optimizer.stored_gradients(), rtol=0, atol=0)
    model.base_model.model.bert.pooler.dense.weight.requires_grad_(True)
    model(input_ids=tokens, labels=torch.zeros(8, dtype=torch.long)).loss.backward()
    with pytest.raises(ValueError, match="the parameters that require grad changed since the window was made"):
        optimizer.step()
    with pytest.raises(ValueError, match="the parameters that require grad changed since the window was made"):
        resumed.step()
    loaded_after = MFAC(model.parameters(), lr=1e-3, num_grads=4, damp=1e-4)
    loaded_after.load_state_dict(optimizer.state_dict())
    with pytest.raises(ValueError, match="the saved window was not made for these parameters"):
        loaded_after.step()

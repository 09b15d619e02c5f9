"""Each parameter of the supervised methods (sft, sft-lora, qlora) changes what the run does.

The trainer is built in-process (tuneforge_trainer.supervised.build) and the test looks at what the
parameter should change: the tokenized rows, the batches, the adapter, the optimizer, the learning-rate
schedule, or a step of training. CUDA-only paths skip with their reason when there is no GPU.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from tuneforge_common.methods import QLoraParams, SftLoraParams, SftParams, param_fields

REPO = Path(__file__).resolve().parents[2]
CHAT = REPO / "examples" / "datasets" / "sample-chat.jsonl"
QA = REPO / "examples" / "datasets" / "sample-qa.jsonl"
NO_CUDA = "needs a CUDA GPU; this machine has none"

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")


@pytest.fixture
def build(tiny_model_dir, tmp_path):
    """build(dataset=..., params_cls=..., full=..., **flags) -> supervised.Built for that run."""
    from tuneforge_trainer import runner, supervised

    counter = iter(range(1000))

    def make(dataset: Path = CHAT, params_cls: type = SftLoraParams, full: bool = False, **flags):
        params = params_cls(**{"max_steps": 2, "batch_size": 2, **flags})
        run = next(counter)
        paths = runner.RunPaths(tiny_model_dir, dataset, tmp_path / f"out-{run}", None)
        method = "sft" if full else "sft-lora"
        return supervised.build(method, params, paths, str(tmp_path / "cache"), full=full)

    return make


def first_batch(built):
    return next(iter(built.trainer.get_train_dataloader()))


def lora_modules(model) -> dict[str, torch.nn.Module]:
    return {name: module for name, module in model.named_modules() if hasattr(module, "lora_A")}


def learning_rates(built, steps: int = 10) -> list[float]:
    trainer = built.trainer
    trainer.create_optimizer_and_scheduler(num_training_steps=steps)
    rates = []
    for _ in range(steps):
        rates.append(trainer.lr_scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    return rates


def trained_lora_change(built) -> float:
    """How far the LoRA B matrices moved in the run (they start at zero)."""
    built.trainer.train()
    modules = lora_modules(built.trainer.model).values()
    return sum(float(m.lora_B["default"].weight.detach().abs().sum()) for m in modules)


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --- the adapter ------------------------------------------------------------------------------------


def test_lora_rank_sets_the_adapter_matrices_rank(build):
    for rank in (2, 8):
        modules = lora_modules(build(lora_rank=rank).trainer.model)
        assert modules and {m.lora_A["default"].weight.shape[0] for m in modules.values()} == {rank}


def test_lora_alpha_sets_the_scaling(build):
    modules = lora_modules(build(lora_rank=4, lora_alpha=32).trainer.model)
    assert {m.scaling["default"] for m in modules.values()} == {8.0}


def test_lora_dropout_sets_the_dropout_layers(build):
    modules = lora_modules(build(lora_dropout=0.3).trainer.model)
    assert {m.lora_dropout["default"].p for m in modules.values()} == {0.3}


def test_target_modules_choose_the_adapted_layers(build):
    every = {n.rsplit(".", 1)[-1] for n in lora_modules(build().trainer.model)}
    assert {"q_proj", "v_proj", "down_proj"} <= every and "lm_head" not in every  # all-linear
    chosen = {n.rsplit(".", 1)[-1] for n in lora_modules(build(target_modules="q_proj, v_proj").trainer.model)}
    assert chosen == {"q_proj", "v_proj"}


def test_unknown_target_module_names_the_flag_and_the_models_layers(build):
    with pytest.raises(SystemExit, match=r"--target_modules=wq: no such modules.*q_proj"):
        build(target_modules="wq")


def test_loraplus_lr_ratio_gives_lora_b_a_higher_learning_rate(build):
    trainer = build(learning_rate=1e-4, loraplus_lr_ratio=16).trainer
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    rates = {names[id(p)]: g["lr"] for g in trainer.optimizer.param_groups for p in g["params"]}
    assert [lr for n, lr in rates.items() if "lora_B" in n] == pytest.approx([1.6e-3] * 14)
    assert [lr for n, lr in rates.items() if "lora_A" in n] == pytest.approx([1e-4] * 14)


def test_merge_adapter_saves_a_complete_model_equal_to_base_plus_adapter(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tuneforge_trainer import supervised

    output = tmp_path / "adapter"
    params = SftLoraParams(max_steps=2, batch_size=2, learning_rate=5e-3, merge_adapter=True)
    extras = {"model_path": str(tiny_model_dir), "dataset_path": str(CHAT), "output_dir": str(output)}
    supervised.train("sft-lora", params, extras, full=False)
    merged_dir = output / "merged"
    assert (merged_dir / "model.safetensors").is_file() and (merged_dir / "tokenizer.json").is_file()
    assert not (merged_dir / "adapter_config.json").exists()
    ids = torch.randint(5, 500, (2, 12))
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        with_adapter = PeftModel.from_pretrained(base, output).eval()(input_ids=ids).logits
        untrained = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()(input_ids=ids).logits
    torch.testing.assert_close(merged, with_adapter, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(merged, untrained, atol=1e-4)  # the adapter did change the model


def test_full_sft_trains_every_weight(build):
    model = build(params_cls=SftParams, full=True).trainer.model
    assert not lora_modules(model)
    assert all(p.requires_grad for p in model.parameters())


# --- rows and sequences ---------------------------------------------------------------------------


def test_max_samples_limits_the_rows(build):
    assert build(max_samples=10).train_rows == 10
    assert build(max_samples=-1).train_rows == 40


def test_max_seq_length_truncates_every_sample(build):
    longest = max(map(len, build(packing=False).trainer.train_dataset["input_ids"]))
    assert longest > 40
    rows = build(packing=False, max_seq_length=32).trainer.train_dataset["input_ids"]
    assert max(map(len, rows)) == 32


def test_packing_fills_sequences_without_padding_and_keeps_samples_apart(build):
    padded, packed = first_batch(build(packing=False)), first_batch(build(packing=True, max_seq_length=256))
    assert "attention_mask" in padded and "position_ids" not in padded
    # Padding-free: rows of several samples, each restarting its positions, no attention mask at all.
    assert packed["input_ids"].shape[0] == 2 and "attention_mask" not in packed
    starts = (packed["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert len(starts) > 2 and starts[0] == 0


def test_a_row_per_packed_sequence_gives_the_loss_of_trls_single_row(build):
    """Without FlashAttention-2 each packed sequence gets its own row (less attention work); same loss."""
    from tuneforge_trainer.supervised import RowPerPackedSequence

    built = build(packing=True, max_seq_length=128)
    collator = built.trainer.data_collator
    assert isinstance(collator, RowPerPackedSequence)
    examples = [built.trainer.train_dataset[i] for i in range(2)]
    rows, joined = collator(examples), collator.collator(examples)
    assert rows["input_ids"].shape[0] == 2 and joined["input_ids"].shape[0] == 1
    assert int(rows["packed_tokens"]) == joined["input_ids"].shape[1]
    model = built.trainer.model.eval()
    keys = ("input_ids", "labels", "position_ids")
    with torch.no_grad():
        row_loss = model(**{k: rows[k] for k in keys}, use_cache=False).loss
        joined_loss = model(**{k: joined[k] for k in keys}, use_cache=False).loss
    torch.testing.assert_close(row_loss, joined_loss, atol=1e-5, rtol=1e-5)
    built.trainer.model.train()
    built.trainer.train()  # TRL's num_tokens metric counts every packed token, not one row's width
    logged = [h for h in built.trainer.state.log_history if "num_tokens" in h]
    assert logged[-1]["num_tokens"] == built.trainer.state.num_input_tokens_seen


def test_packed_samples_do_not_attend_to_each_other(tiny_model_dir):
    """The logits of two samples packed into one row equal those of each sample alone (SDPA on a CPU too).

    transformers builds the block mask from the restarting position ids when there is no cache, as in
    training (TRL passes use_cache=False).
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    a, b = torch.randint(5, 500, (1, 7)), torch.randint(5, 500, (1, 5))
    packed_ids = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(7), torch.arange(5)]).unsqueeze(0)
    with torch.no_grad():
        packed = model(input_ids=packed_ids, position_ids=positions, use_cache=False).logits
        alone = torch.cat([model(input_ids=a, use_cache=False).logits, model(input_ids=b, use_cache=False).logits], 1)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-4)


def test_completion_only_loss_masks_the_prompt(build, tmp_path):
    def masked_share(built) -> float:
        """Share of the batch's tokens (padding aside) that the loss leaves out."""
        batch = first_batch(built)
        tokens = batch["input_ids"] != built.tokenizer.pad_token_id
        learned = (batch["labels"] != -100) & tokens
        return 1 - learned.sum().item() / tokens.sum().item()

    for dataset in (CHAT, QA):  # chat (assistant turns) and prompt/answer rows (completions)
        only_answers = masked_share(build(dataset, packing=True, max_seq_length=256))
        every_token = masked_share(build(dataset, packing=True, max_seq_length=256, completion_only_loss=False))
        # Every token but each packed sample's first, which must not be predicted from the sample before it.
        assert every_token < 0.05 and only_answers > 0.2


def test_chat_template_without_generation_markers_learns_the_last_assistant_turn(tmp_path):
    from datasets import Dataset

    from tuneforge_trainer.data import chat_as_prompt_completion

    rows = Dataset.from_list(
        [
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello."},
                    {"role": "user", "content": "Bye"},
                    {"role": "assistant", "content": "Goodbye."},
                ]
            },
            {"messages": [{"role": "user", "content": "no answer"}]},
        ]
    )
    converted = chat_as_prompt_completion(rows)
    assert len(converted) == 1
    assert [m["content"] for m in converted[0]["prompt"]] == ["Be brief.", "Hi", "Hello.", "Bye"]
    assert converted[0]["completion"] == [{"role": "assistant", "content": "Goodbye."}]


def test_prompt_input_and_output_columns_pick_the_columns(build, tmp_path):
    rows = [{"ask": f"question {i}?", "reply": f"answer {i}.", "question": "ignored"} for i in range(6)]
    dataset = write_rows(tmp_path / "custom-columns.jsonl", rows)
    built = build(dataset, prompt_input_column="ask", prompt_output_column="reply", packing=False)
    assert built.data_format == "ask/reply"
    text = built.tokenizer.decode(built.trainer.train_dataset[0]["input_ids"])
    assert "question 0?" in text and "answer 0." in text and "ignored" not in text


def test_validation_ratio_holds_rows_out_for_eval(build):
    built = build(validation_ratio=0.25)
    assert built.train_rows == 30 and len(built.eval_dataset) == 10
    assert built.trainer.args.eval_strategy == "steps"
    assert build().eval_dataset is None


def test_fim_ratio_reorders_that_share_of_text_rows(build, tmp_path):
    code = [{"text": f"def add_{i}(a, b):\n    total = a + b\n    return total * {i}\n"} for i in range(40)]
    dataset = write_rows(tmp_path / "code.jsonl", code)
    plain = build(dataset, params_cls=SftParams, full=True, packing=False)
    fim = build(dataset, params_cls=SftParams, full=True, packing=False, fim_ratio=0.5)
    texts = [fim.tokenizer.decode(ids) for ids in fim.trainer.train_dataset["input_ids"]]
    reordered = [t for t in texts if "<|fim_prefix|>" in t]
    assert 10 <= len(reordered) <= 30  # about half of 40
    assert all(t.index("<|fim_suffix|>") < t.index("<|fim_middle|>") for t in reordered)
    # The sentinels are single new tokens, and the embeddings grew to learn them.
    assert len(fim.tokenizer) == len(plain.tokenizer) + 3
    assert fim.trainer.model.get_input_embeddings().weight.shape[0] == len(fim.tokenizer)
    with pytest.raises(SystemExit, match="fill-in-the-middle reorders plain-text rows"):
        build(CHAT, params_cls=SftParams, full=True, fim_ratio=0.5)


def test_seed_decides_the_adapter_initialisation_and_the_data_order(build):
    def lora_a(built):
        return next(iter(lora_modules(built.trainer.model).values())).lora_A["default"].weight.detach().clone()

    def order(built):
        return [b["input_ids"][0, :8].tolist() for b in built.trainer.get_train_dataloader()][:4]

    one, same, other = (build(packing=False, seed=s) for s in (1, 1, 2))
    assert torch.equal(lora_a(one), lora_a(same)) and not torch.equal(lora_a(one), lora_a(other))
    assert order(one) == order(same) and order(one) != order(other)


# --- batches, steps and the schedule -------------------------------------------------------------


def test_batch_size_sets_the_samples_per_batch(build):
    assert first_batch(build(packing=False, batch_size=3))["input_ids"].shape[0] == 3
    assert first_batch(build(packing=False, batch_size=5))["input_ids"].shape[0] == 5


def test_max_steps_grad_accum_and_epochs_set_the_number_of_optimizer_steps(build):
    assert build(max_steps=3, max_samples=8).trainer.train().global_step == 3
    # 8 rows, 2 per batch: 4 batches, so 4 steps an epoch (8 in two); with 2 batches accumulated per step, 2.
    assert build(max_steps=-1, epochs=2, max_samples=8, packing=False).trainer.train().global_step == 8
    accumulated = build(max_steps=-1, epochs=1, max_samples=8, packing=False, grad_accum_steps=2)
    assert accumulated.trainer.train().global_step == 2


def test_learning_rate_scheduler_and_warmup_shape_the_schedule(build):
    constant = learning_rates(build(learning_rate=1e-3, lr_scheduler_type="constant"))
    assert constant == [pytest.approx(1e-3)] * 10
    linear = learning_rates(build(learning_rate=1e-3, lr_scheduler_type="linear"))
    assert linear[0] == pytest.approx(1e-3) and linear[5] == pytest.approx(5e-4)
    cosine = learning_rates(build(learning_rate=1e-3, lr_scheduler_type="cosine"))
    assert cosine[5] == pytest.approx(5e-4) and cosine[2] > linear[2]  # cosine stays high longer
    warm_steps = learning_rates(build(learning_rate=1e-3, lr_scheduler_type="constant_with_warmup", warmup_steps=4))
    assert warm_steps[:5] == [pytest.approx(x) for x in (0, 2.5e-4, 5e-4, 7.5e-4, 1e-3)]
    # Mistral's warmup_fraction: 0.2 of 10 steps is 2 steps of warmup.
    warm_ratio = learning_rates(build(learning_rate=1e-3, lr_scheduler_type="constant_with_warmup", warmup_ratio=0.2))
    assert warm_ratio[:3] == [pytest.approx(x) for x in (0, 5e-4, 1e-3)]


def test_weight_decay_reaches_the_optimizer(build):
    trainer = build(weight_decay=0.1).trainer
    trainer.create_optimizer()
    assert 0.1 in {g["weight_decay"] for g in trainer.optimizer.param_groups}


def test_max_grad_norm_clips_the_update(build):
    free = trained_lora_change(build(max_steps=1, learning_rate=1e-2, max_grad_norm=0.0))
    clipped = trained_lora_change(build(max_steps=1, learning_rate=1e-2, max_grad_norm=1e-6))
    assert clipped < free * 0.5


def test_learning_rate_scales_the_update(build):
    slow = trained_lora_change(build(max_steps=1, learning_rate=1e-5, lr_scheduler_type="constant"))
    fast = trained_lora_change(build(max_steps=1, learning_rate=1e-3, lr_scheduler_type="constant"))
    assert fast > slow * 10


# --- logging, checkpoints, precision and the hardware switches -----------------------------------------


def test_logging_steps_and_checkpoint_settings_reach_the_trainer(build):
    args = build(logging_steps=3, save_steps=5, save_total_limit=2, checkpoint_metric="eval_loss").trainer.args
    assert (args.logging_steps, args.save_steps, args.save_total_limit) == (3, 5, 2)
    assert args.save_strategy == "steps"
    tracked = build(save_steps=5, validation_ratio=0.2, checkpoint_metric="eval_mean_token_accuracy").trainer.args
    assert tracked.metric_for_best_model == "eval_mean_token_accuracy" and tracked.greater_is_better
    assert build().trainer.args.save_strategy == "no"


def test_compute_type_sets_mixed_precision(build):
    assert build(compute_type="bf16").trainer.args.bf16
    auto = build(compute_type="auto").trainer.args
    assert not auto.bf16 and not auto.fp16  # fp32 on a CPU
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="--compute_type=fp16 needs a CUDA GPU"):
            build(compute_type="fp16")


def test_gradient_checkpointing_recomputes_activations_only_when_asked(build):
    for asked in (False, True):
        built = build(gradient_checkpointing=asked, max_steps=1)
        built.trainer.train()
        assert built.trainer.model.base_model.model.model.gradient_checkpointing is asked


def test_flash_attention_falls_back_to_sdpa_with_a_notice(build, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU; the fallback is for machines without one")
    built = build(flash_attention=True)
    assert built.trainer.model.config._attn_implementation == "sdpa"
    assert "falling back to PyTorch SDPA attention" in capsys.readouterr().err


def test_liger_kernel_needs_cuda_and_the_package(build):
    from tuneforge_trainer.hardware import installed

    if torch.cuda.is_available() and installed("liger_kernel"):
        assert build(use_liger_kernel=True).trainer.args.use_liger_kernel
        return
    with pytest.raises(SystemExit, match="--use_liger_kernel=true"):
        build(use_liger_kernel=True)


def test_4bit_quantization_settings_reach_bitsandbytes(monkeypatch, tiny_model_dir):
    """QLoRA's quantization choices go to BitsAndBytesConfig; the load itself is checked on a GPU below."""
    import transformers

    from tuneforge_trainer import hardware

    seen = {}
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(
        transformers.AutoModelForCausalLM, "from_pretrained", lambda path, **kwargs: seen.update(kwargs)
    )
    params = QLoraParams(bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False)
    hardware.load_model(tiny_model_dir, params, "bf16")
    config = seen["quantization_config"]
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "fp4" and not config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == torch.bfloat16
    hardware.load_model(tiny_model_dir, dataclasses.replace(params, load_in_4bit=False), "fp32")
    assert "quantization_config" not in seen or seen.get("quantization_config") is config  # not asked again


@pytest.mark.skipif(not torch.cuda.is_available(), reason=f"QLoRA (4-bit NF4) {NO_CUDA}")
def test_qlora_trains_on_a_4bit_base(build):  # pragma: no cover - GPU only
    built = build(params_cls=QLoraParams)
    assert getattr(built.trainer.model, "is_loaded_in_4bit", False)
    built.trainer.train()


def test_every_builtin_methods_parameter_has_a_test():
    """A new parameter of any built-in method needs a test that shows it takes effect: here for the
    supervised methods, in test_dpo.py / test_grpo.py / test_custom_templates.py for the others."""
    from tuneforge_common.methods import BUILTIN_METHODS

    here = Path(__file__).parent
    sources = {
        "sft": [Path(__file__)],
        "sft-lora": [Path(__file__), here / "test_sft_lora.py"],
        "qlora": [Path(__file__)],
        "dpo": [here / "test_dpo.py", Path(__file__)],
        "grpo": [here / "test_grpo.py", Path(__file__)],
        "custom01": [here / "test_custom_templates.py", Path(__file__)],
        "custom02": [here / "test_custom_templates.py", Path(__file__)],
    }
    untested = {}
    for method in BUILTIN_METHODS:
        text = "".join(path.read_text() for path in sources[method.id])
        missing = sorted(f.name for f in param_fields(method.params) if f.name not in text)
        if missing:
            untested[method.id] = missing
    assert untested == {}, f"parameters without a test: {untested}"

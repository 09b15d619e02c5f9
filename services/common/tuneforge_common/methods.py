"""Parameter schemas of the built-in training methods, and the rules for added ones.

One frozen dataclass per method, sharing fields by inheritance; field metadata is the help text,
bounds, aliases and group. Validation (catalog), runner flags (trainer), CLI and UI forms are all
generated from these, so a parameter is declared exactly once.

Where the names come from (canonical names are snake_case; the runner also reads each from the
upper-case environment variable, which matches DeepExtension's names: LORA_RANK, LOAD_IN_4BIT, ...):

* DeepExtension's generic table: every parameter of `DeepExtensionParams` (the custom01/custom02
  templates get exactly that table); PromptInputColumn/PromptOutputColumn are accepted as aliases.
* UModelVerse: compute_type, save_steps, save_total_limit, logging_steps (log_interval),
  max_seq_length (cutoff_len, truncation_length), lr_scheduler_type, validation_ratio,
  flash_attention, lora_rank/lora_alpha/lora_dropout and loraplus_lr_ratio.
* Mistral's TrainingParametersIn: training_steps, warmup_fraction and seq_len are aliases of
  max_steps, warmup_ratio and max_seq_length; learning_rate, weight_decay, epochs and fim_ratio are
  canonical names. OpenAI's n_epochs is an alias of epochs.

Precedence, as in DeepExtension: max_steps > 0 overrides epochs and warmup_steps > 0 overrides
warmup_ratio (no error when both are given). The rules that tie fields together are in
`CROSS_FIELD_RULES`, applied by `params.resolve_parameters(..., method_id=...)`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from .errors import FieldViolation, ViolationCollector
from .params import ParamSpec, parse_param_spec, specs_from_dataclass
from .params import env_name as env_name  # re-exported: runners and tests import it from here


def param(
    default: Any,
    help: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    choices: tuple[str, ...] = (),
    aliases: tuple[str, ...] = (),
    group: str = "basic",
) -> Any:
    return field(
        default=default,
        metadata={
            "help": help,
            "min": minimum,
            "max": maximum,
            "choices": choices,
            "aliases": aliases,
            "group": group,
        },
    )


def redefault(base: type, name: str, default: Any, help: str | None = None) -> Any:
    """The field `name` of `base` with another default (and help): a subclass changes one thing only."""
    inherited = next(f for f in dataclasses.fields(base) if f.name == name)
    metadata = dict(inherited.metadata)
    if help is not None:
        metadata["help"] = help
    return field(default=default, metadata=metadata)


LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
)
COMPUTE_TYPES = ("auto", "bf16", "fp16", "fp32")
BNB_4BIT_QUANT_TYPES = ("nf4", "fp4")
# TRL 1.16 DPOConfig.loss_type (one at a time here; TRL also combines several with loss_weights).
DPO_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)
MAX_TOKENS = 131072


# --- parameter groups (shared by inheritance) ----------------------------------------------------


@dataclass(frozen=True)
class TrainingParams:
    """DeepExtension's generic schedule and data parameters: every built-in method takes these."""

    max_seq_length: int = param(
        1024,
        "Maximum tokens in one training sequence (prompt and answer together); longer samples are truncated. "
        "UModelVerse's truncation length, Mistral's seq_len.",
        minimum=16,
        maximum=MAX_TOKENS,
        aliases=("seq_len", "cutoff_len", "truncation_length"),
    )
    max_samples: int = param(
        -1,
        "Maximum number of training samples to load; -1 (or 0) loads all.",
        minimum=-1,
        maximum=100_000_000,
    )
    epochs: float = param(
        1.0,
        "Passes over the dataset; ignored when max_steps > 0.",
        minimum=0.01,
        maximum=50,
        aliases=("n_epochs", "num_train_epochs"),
    )
    max_steps: int = param(
        -1,
        "Total optimizer steps; when > 0 it overrides epochs. -1 (or 0) trains for epochs.",
        minimum=-1,
        maximum=10_000_000,
        aliases=("training_steps",),
    )
    batch_size: int = param(
        4, "Samples per device per step.", minimum=1, maximum=64, aliases=("per_device_train_batch_size",)
    )
    grad_accum_steps: int = param(
        1,
        "Gradient accumulation steps: batches summed into one optimizer step.",
        minimum=1,
        maximum=128,
        aliases=("gradient_accumulation_steps",),
    )
    learning_rate: float = param(2e-4, "Initial (peak) learning rate.", minimum=1e-9, maximum=1.0, aliases=("lr",))
    warmup_steps: int = param(
        0,
        "Steps over which the learning rate rises to learning_rate; when > 0 it overrides warmup_ratio.",
        minimum=0,
        maximum=1_000_000,
        group="advanced",
    )
    warmup_ratio: float = param(
        0.0,
        "Fraction of the total steps used for warmup; used only when warmup_steps is 0.",
        minimum=0.0,
        maximum=0.5,
        aliases=("warmup_fraction",),
        group="advanced",
    )
    max_grad_norm: float = param(
        1.0, "Gradient clipping norm; 0 turns clipping off.", minimum=0.0, maximum=100.0, group="advanced"
    )
    prompt_input_column: str = param(
        "",
        "Column used as the prompt for prompt/response rows (e.g. question, instruction); empty detects it.",
        aliases=("PromptInputColumn",),
    )
    prompt_output_column: str = param(
        "",
        "Column used as the expected answer (e.g. answer, response); empty detects it.",
        aliases=("PromptOutputColumn",),
    )


@dataclass(frozen=True)
class TrainerParams(TrainingParams):
    """What TuneForge's own runners add: optimizer, precision, checkpoints, logging and a validation split."""

    weight_decay: float = param(0.0, "Weight decay (L2 penalty).", minimum=0.0, maximum=1.0, group="advanced")
    lr_scheduler_type: str = param(
        "linear", "Learning-rate schedule.", choices=LR_SCHEDULERS, aliases=("lr_scheduler",), group="advanced"
    )
    compute_type: str = param(
        "auto",
        "Training precision: bf16 or fp16 mixed precision, or fp32. auto is bf16 on a GPU that supports it, "
        "else fp32; fp16 needs a CUDA GPU.",
        choices=COMPUTE_TYPES,
        aliases=("computation_type", "precision"),
        group="advanced",
    )
    flash_attention: bool = param(
        False,
        "Use FlashAttention-2 (needs bf16 or fp16 compute); where the GPU or the flash-attn package is missing "
        "the run falls back to PyTorch's SDPA attention and says so in its log.",
        aliases=("use_flash_attention",),
        group="advanced",
    )
    logging_steps: int = param(
        1, "Report metrics every N steps.", minimum=1, maximum=100_000, aliases=("log_interval",), group="advanced"
    )
    save_steps: int = param(
        0,
        "Save a checkpoint every N steps (a stopped job resumes from the latest); 0 saves only the final result.",
        minimum=0,
        maximum=1_000_000,
        aliases=("checkpoint_interval", "save_interval"),
        group="advanced",
    )
    save_total_limit: int = param(
        0,
        "Keep at most N checkpoints, deleting the oldest; 0 keeps all. Needs save_steps > 0.",
        minimum=0,
        maximum=10_000,
        aliases=("max_checkpoints",),
        group="advanced",
    )
    checkpoint_metric: str = param(
        "eval_loss",
        "Metric that picks the best checkpoint, kept besides the last save_total_limit ones (lower is better, "
        "except for names with reward or accuracy); falls back to loss when no checkpoint has it.",
        aliases=("metric_for_best_model",),
        group="advanced",
    )
    validation_ratio: float = param(
        0.0,
        "Share of the rows held out as a validation set (the same rows for every run of a dataset), "
        "evaluated every save_steps steps (every logging_steps steps when save_steps is 0) and at the end; "
        "0 trains on every row.",
        minimum=0.0,
        maximum=0.5,
        aliases=("val_size", "validation_split"),
        group="advanced",
    )
    seed: int = param(
        42, "Random seed for data order and initialisation.", minimum=0, maximum=2**31 - 1, group="advanced"
    )
    gradient_checkpointing: bool = param(
        False,
        "Recompute activations in the backward pass instead of keeping them: much less GPU memory for long "
        "sequences, about a third slower.",
        aliases=("activation_checkpointing",),
        group="advanced",
    )
    use_liger_kernel: bool = param(
        False,
        "Liger's fused Triton kernels (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy): less GPU memory "
        "and faster steps; needs a CUDA GPU and the liger-kernel package.",
        aliases=("liger_kernel", "enable_liger_kernel"),
        group="advanced",
    )


@dataclass(frozen=True)
class LoraRankParams:
    lora_rank: int = param(8, "Rank of the LoRA adapter matrices.", minimum=1, maximum=256, aliases=("lora_r", "rank"))


@dataclass(frozen=True)
class LoraParams(LoraRankParams):
    lora_alpha: int = param(16, "LoRA scaling factor (alpha).", minimum=1, maximum=1024, aliases=("lora_scaling",))
    lora_dropout: float = param(0.05, "Dropout on the LoRA layers.", minimum=0.0, maximum=0.9, group="advanced")
    loraplus_lr_ratio: float = param(
        0.0,
        "LoRA+: the B matrices learn at learning_rate times this ratio (16 is typical); 0 turns LoRA+ off, "
        "otherwise at least 1.",
        minimum=0.0,
        maximum=1000.0,
        aliases=("lora_plus_ratio",),
        group="advanced",
    )
    target_modules: str = param(
        "all-linear",
        "Modules that get LoRA matrices: all-linear (every linear layer but the output head), or "
        "comma-separated module names such as q_proj,v_proj.",
        aliases=("lora_target", "lora_target_modules"),
        group="advanced",
    )
    merge_adapter: bool = param(
        False,
        "Also save the complete model: the adapter merged into the full-precision base, in safetensors with "
        "the tokenizer, under merged/ next to the adapter.",
        aliases=("save_merged_model",),
        group="advanced",
    )


@dataclass(frozen=True)
class Load4BitParams:
    load_in_4bit: bool = param(
        False,
        "Load the base model quantized to 4 bits (bitsandbytes NF4, as QLoRA) to save GPU memory; needs a CUDA GPU.",
    )


@dataclass(frozen=True)
class UseLoraParams:
    use_lora: bool = param(
        True, "Train a LoRA adapter (true) or every weight (false); the lora_* parameters apply only when true."
    )


# --- the built-in methods' schemas ---------------------------------------------------------------


@dataclass(frozen=True)
class SupervisedParams(TrainerParams):
    """How supervised rows become batches: the SFT methods' own parameters."""

    packing: bool = param(
        True,
        "Pack samples into full sequences with no padding (best-fit packing, padding-free: each sample still "
        "attends only to itself), so no compute goes to padding; false pads each batch to its longest sample.",
        aliases=("padding_free",),
        group="advanced",
    )
    completion_only_loss: bool = param(
        True,
        "Learn only from the answers: the loss covers assistant turns and completions, not the prompts; "
        "false learns from every token. Plain-text rows always learn from every token.",
        aliases=("train_on_completions_only", "assistant_only_loss"),
        group="advanced",
    )


@dataclass(frozen=True)
class SftParams(SupervisedParams):
    """Full supervised fine-tuning: every weight is trained (TRL SFTTrainer)."""

    learning_rate: float = redefault(TrainingParams, "learning_rate", 2e-5)
    fim_ratio: float = param(
        0.0,
        "Fill-in-the-middle share (Mistral's fim_ratio), for code: that share of plain-text rows is reordered "
        "as prefix, suffix, middle around the tokenizer's FIM tokens; 0 turns it off. Only full fine-tuning "
        "takes it, since the FIM tokens' embeddings must learn too.",
        minimum=0.0,
        maximum=1.0,
        group="advanced",
    )


@dataclass(frozen=True)
class SftLoraParams(SupervisedParams, Load4BitParams, LoraParams):
    """Supervised fine-tuning of a LoRA adapter (TRL SFTTrainer + PEFT)."""


@dataclass(frozen=True)
class QLoraParams(SftLoraParams):
    """Supervised fine-tuning of a LoRA adapter on a 4-bit quantized base model (QLoRA; needs a CUDA GPU)."""

    load_in_4bit: bool = redefault(
        Load4BitParams,
        "load_in_4bit",
        True,
        "Load the base model quantized to 4 bits (needs a CUDA GPU); false trains a plain LoRA adapter and "
        "ignores the bnb_4bit_* parameters.",
    )
    bnb_4bit_quant_type: str = param(
        "nf4",
        "4-bit data type: nf4 (NormalFloat, QLoRA's choice) or fp4.",
        choices=BNB_4BIT_QUANT_TYPES,
        aliases=("quant_type",),
        group="advanced",
    )
    bnb_4bit_use_double_quant: bool = param(
        True,
        "Quantize the quantization constants too (QLoRA's double quantization; saves about 0.4 bits a weight).",
        aliases=("double_quant",),
        group="advanced",
    )


@dataclass(frozen=True)
class DpoParams(TrainerParams, LoraParams, UseLoraParams):
    """Direct Preference Optimization on prompt/chosen/rejected rows (TRL DPOTrainer)."""

    learning_rate: float = redefault(TrainingParams, "learning_rate", 5e-5)
    beta: float = param(
        0.1,
        "How far the model may move from the reference model: higher keeps it closer (the regularizer for ipo).",
        minimum=0.001,
        maximum=10.0,
    )
    loss_type: str = param("sigmoid", "Preference loss (TRL DPOConfig.loss_type).", choices=DPO_LOSS_TYPES)
    max_prompt_length: int = param(
        512,
        "Maximum prompt tokens; longer prompts keep their end. Must be less than max_seq_length.",
        minimum=1,
        maximum=MAX_TOKENS,
        aliases=("max_input_length",),
    )


@dataclass(frozen=True)
class GrpoParams(TrainerParams, LoraParams, UseLoraParams):
    """Group Relative Policy Optimization with rule-based rewards (TRL GRPOTrainer)."""

    learning_rate: float = redefault(TrainingParams, "learning_rate", 1e-5)
    num_generations: int = param(
        4,
        "Completions sampled per prompt. GRPO scores each completion against the others of its group, so it "
        "needs at least 2; batch_size x grad_accum_steps must be divisible by it.",
        minimum=2,
        maximum=64,
    )
    max_prompt_length: int = param(
        512,
        "Maximum prompt tokens; longer prompts keep their end. Must be less than max_seq_length.",
        minimum=1,
        maximum=MAX_TOKENS,
        aliases=("max_input_length",),
    )
    max_completion_length: int = param(
        256,
        "Maximum tokens generated per completion; with max_prompt_length at most max_seq_length.",
        minimum=1,
        maximum=MAX_TOKENS,
        aliases=("max_content_length",),
    )
    beta: float = param(
        0.0,
        "KL penalty against the reference model; 0 (TRL's default) does not load a reference model.",
        minimum=0.0,
        maximum=10.0,
        group="advanced",
    )
    temperature: float = param(
        1.0, "Sampling temperature of the generations.", minimum=0.01, maximum=5.0, group="advanced"
    )
    checkpoint_metric: str = redefault(
        TrainerParams,
        "checkpoint_metric",
        "eval_reward",
        "Metric that picks the best checkpoint, kept besides the last save_total_limit ones: the mean reward on "
        "the validation prompts by default (higher is better); falls back to loss when no checkpoint has it.",
    )
    reward_functions: str = param(
        "accuracy,format",
        "Comma-separated names of the reward functions that score each completion.",
        aliases=("reward_funcs",),
    )


@dataclass(frozen=True)
class DeepExtensionParams(TrainingParams, Load4BitParams, LoraRankParams):
    """DeepExtension's generic parameter table, passed as is to customisable training code."""

    max_input_length: int = param(
        512,
        "Maximum tokens of the input prompt; must be less than max_seq_length.",
        minimum=1,
        maximum=MAX_TOKENS,
    )
    max_content_length: int = param(
        512, "Maximum tokens of the training content (the answer).", minimum=1, maximum=MAX_TOKENS
    )
    num_generations: int = param(
        4, "Generations per prompt for reward or validation.", minimum=1, maximum=64, group="advanced"
    )


# --- the built-in methods ------------------------------------------------------------------------


def greater_is_better(metric: str) -> bool:
    """Whether a higher value of this metric is better (rewards, accuracies); losses and the rest: lower."""
    return any(word in metric for word in ("reward", "accuracy"))


@dataclass(frozen=True)
class MethodDefinition:
    id: str
    display_name: str
    description: str
    training_type: str
    lifecycle: str
    params: type
    entrypoint: str
    # Dataset formats (tuneforge_catalog.datasets names) the method trains on; empty: any, its code decides.
    dataset_formats: tuple[str, ...] = ()


SUPERVISED_FORMATS = ("chat", "prompt_completion", "instruction", "columns", "text")


def _entrypoint(method_id: str) -> str:
    return "tuneforge_trainer.methods." + method_id.replace("-", "_")


def _template(method_id: str) -> MethodDefinition:
    return MethodDefinition(
        id=method_id,
        display_name=method_id.capitalize(),
        description=f"Customisable template: edit tuneforge_trainer/methods/{method_id}.py; it receives "
        "DeepExtension's generic parameter table.",
        training_type="chat",
        lifecycle="customized",
        params=DeepExtensionParams,
        entrypoint=_entrypoint(method_id),
    )


BUILTIN_METHODS: tuple[MethodDefinition, ...] = (
    MethodDefinition(
        id="sft",
        display_name="Full SFT",
        description="Supervised fine-tuning of every weight with TRL SFTTrainer; saves a complete model.",
        training_type="chat",
        lifecycle="complete",
        params=SftParams,
        entrypoint=_entrypoint("sft"),
        dataset_formats=SUPERVISED_FORMATS,
    ),
    MethodDefinition(
        id="sft-lora",
        display_name="SFT with LoRA",
        description="Supervised fine-tuning of a LoRA adapter with TRL SFTTrainer and PEFT; "
        "chat datasets use the model's chat template.",
        training_type="chat",
        lifecycle="customized",
        params=SftLoraParams,
        entrypoint="tuneforge_trainer.methods.sft_lora",
        dataset_formats=SUPERVISED_FORMATS,
    ),
    MethodDefinition(
        id="qlora",
        display_name="QLoRA",
        description="Supervised fine-tuning of a LoRA adapter on a 4-bit quantized base model "
        "(bitsandbytes); needs a CUDA GPU.",
        training_type="chat",
        lifecycle="customized",
        params=QLoraParams,
        entrypoint=_entrypoint("qlora"),
        dataset_formats=SUPERVISED_FORMATS,
    ),
    MethodDefinition(
        id="dpo",
        display_name="DPO",
        description="Direct Preference Optimization on prompt/chosen/rejected rows with TRL DPOTrainer.",
        training_type="chat",
        lifecycle="customized",
        params=DpoParams,
        entrypoint=_entrypoint("dpo"),
        dataset_formats=("preference",),
    ),
    MethodDefinition(
        id="grpo",
        display_name="GRPO",
        description="Group Relative Policy Optimization with TRL GRPOTrainer: completions sampled per prompt "
        "are scored by reward functions and compared within their group.",
        training_type="chat",
        lifecycle="customized",
        params=GrpoParams,
        entrypoint=_entrypoint("grpo"),
        # A prompt and the reference answer the rewards compare with: prompt/answer rows, or any named or
        # detected question/answer columns (instruction/output included).
        dataset_formats=("prompt_answer", "columns", "instruction"),
    ),
    _template("custom01"),
    _template("custom02"),
)
BUILTIN_IDS = tuple(m.id for m in BUILTIN_METHODS)


def builtin_method(method_id: str) -> MethodDefinition | None:
    return next((m for m in BUILTIN_METHODS if m.id == method_id), None)


def param_fields(params_cls: type) -> list[dataclasses.Field]:
    return list(dataclasses.fields(params_cls))


def parameter_matrix() -> dict[str, list[str]]:
    """Parameter name -> the sorted ids of the built-in methods that take it."""
    matrix: dict[str, set[str]] = {}
    for method in BUILTIN_METHODS:
        for f in dataclasses.fields(method.params):
            matrix.setdefault(f.name, set()).add(method.id)
    return {name: sorted(ids) for name, ids in matrix.items()}


def parameter_matrix_for(params_cls: type) -> dict[str, list[str]]:
    """The parameter matrix when `params_cls` is a built-in method's schema; empty for any other class."""
    if any(m.params is params_cls for m in BUILTIN_METHODS):
        return parameter_matrix()
    return {}


# --- cross-field rules ---------------------------------------------------------------------------

# A rule reads resolved parameters (canonical names) and yields (parameter name, problem) pairs. Rules
# look parameters up by name and skip the ones a method lacks, so one rule serves several methods.
CrossFieldRule = Callable[[Mapping[str, Any]], list[tuple[str, str]]]


def _prompt_shorter_than_sequence(p: Mapping[str, Any]) -> list[tuple[str, str]]:
    seq = p.get("max_seq_length") or 0
    problems = []
    for name in ("max_input_length", "max_prompt_length"):
        value = p.get(name) or 0
        if value > 0 and seq > 0 and value >= seq:
            problems.append(
                (name, f"must be less than max_seq_length ({seq}) to leave room for the answer, got {value}")
            )
    return problems


def _checkpoint_limit_needs_checkpoints(p: Mapping[str, Any]) -> list[tuple[str, str]]:
    if (p.get("save_total_limit") or 0) > 0 and (p.get("save_steps") or 0) <= 0:
        return [("save_total_limit", "needs save_steps > 0: without it no checkpoints are saved to limit")]
    return []


def _loraplus_ratio(p: Mapping[str, Any]) -> list[tuple[str, str]]:
    ratio = p.get("loraplus_lr_ratio") or 0
    if 0 < ratio < 1:
        return [("loraplus_lr_ratio", f"must be 0 (LoRA+ off) or at least 1, got {ratio}")]
    if ratio > 0 and p.get("use_lora") is False:
        return [("loraplus_lr_ratio", "needs use_lora: LoRA+ sets the learning rate of LoRA matrices")]
    return []


def _flash_attention_precision(p: Mapping[str, Any]) -> list[tuple[str, str]]:
    if p.get("flash_attention") and p.get("compute_type") == "fp32":
        return [("flash_attention", "needs compute_type bf16, fp16 or auto: FlashAttention-2 does not run in fp32")]
    return []


def _grpo_groups(p: Mapping[str, Any]) -> list[tuple[str, str]]:
    # TRL 1.16 GRPOConfig.__post_init__: generation_batch_size = per_device_train_batch_size * num_processes *
    # steps_per_generation (= gradient_accumulation_steps) must be divisible by num_generations, and with
    # evaluation on, per_device_eval_batch_size * num_processes too. Our runners use one process.
    generations, batch, accum = p["num_generations"], p["batch_size"], p["grad_accum_steps"]
    problems = []
    if (batch * accum) % generations:
        problems.append(
            (
                "num_generations",
                f"must divide batch_size x grad_accum_steps ({batch} x {accum} = {batch * accum}): each "
                f"generation batch holds whole groups of {generations} completions",
            )
        )
    if (p.get("validation_ratio") or 0) > 0 and batch % generations:
        problems.append(
            ("num_generations", f"must divide batch_size ({batch}) when validation_ratio > 0 (evaluation batches)")
        )
    return problems


def _grpo_lengths(p: Mapping[str, Any]) -> list[tuple[str, str]]:
    prompt, completion, seq = p["max_prompt_length"], p["max_completion_length"], p["max_seq_length"]
    if prompt + completion > seq:
        return [
            (
                "max_completion_length",
                f"with max_prompt_length ({prompt}) must fit in max_seq_length ({seq}), got {prompt + completion}",
            )
        ]
    return []


REWARD_NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")


def _grpo_rewards(p: Mapping[str, Any]) -> list[tuple[str, str]]:
    names = [n.strip() for n in str(p["reward_functions"]).split(",")]
    if not any(names):
        return [("reward_functions", "must name at least one reward function")]
    bad = [n for n in names if not REWARD_NAME_RE.fullmatch(n)]
    if bad:
        return [("reward_functions", f"must be comma-separated names (a-z, 0-9, _), got {bad[0]!r}")]
    if len(set(names)) != len(names):
        return [("reward_functions", "must not name a reward function twice")]
    return []


TARGET_MODULE_RE = re.compile(r"[A-Za-z0-9_.]{1,128}")


def _lora_targets(p: Mapping[str, Any]) -> list[tuple[str, str]]:
    problems = []
    targets = p.get("target_modules")
    if targets is not None and targets != "all-linear":
        names = [n.strip() for n in str(targets).split(",")]
        bad = next((n for n in names if not TARGET_MODULE_RE.fullmatch(n)), None)
        if bad is not None:
            problems.append(
                ("target_modules", f"must be all-linear or comma-separated module names (q_proj,v_proj), got {bad!r}")
            )
    if p.get("merge_adapter") and p.get("use_lora") is False:
        problems.append(("merge_adapter", "needs use_lora: without an adapter the saved model is already complete"))
    return problems


GENERIC_RULES: tuple[CrossFieldRule, ...] = (
    _lora_targets,
    _prompt_shorter_than_sequence,
    _checkpoint_limit_needs_checkpoints,
    _loraplus_ratio,
    _flash_attention_precision,
)
CROSS_FIELD_RULES: dict[str, tuple[CrossFieldRule, ...]] = {
    "sft": GENERIC_RULES,
    "sft-lora": GENERIC_RULES,
    "qlora": GENERIC_RULES,
    "dpo": GENERIC_RULES,
    "grpo": (*GENERIC_RULES, _grpo_groups, _grpo_lengths, _grpo_rewards),
    "custom01": GENERIC_RULES,
    "custom02": GENERIC_RULES,
}


def check_cross_field(
    method_id: str, resolved: Mapping[str, Any], field_prefix: str = "parameters"
) -> list[FieldViolation]:
    """Violations of the rules that tie a method's parameters together; [] for an added method.

    `resolved` is the output of resolve_parameters (canonical names, every field valid on its own).
    An added method's own code gives its parameters their meaning, so no rule is applied to it.
    """
    return [
        FieldViolation(f"{field_prefix}.{name}", problem)
        for rule in CROSS_FIELD_RULES.get(method_id, ())
        for name, problem in rule(resolved)
    ]


# --- added methods (seed 003's "Add New Method") -------------------------------------------------

TRAINING_TYPES = ("chat", "embedding", "vision-language", "image-generation")
LIFECYCLES = ("customized", "complete", "live")
STAGES = ("training", "saving", "inference_customized", "inference_complete", "deployment")
DEPLOYMENT_ENVIRONMENTS = ("builtin", "custom")
DEFINITION_KEYS = (
    "name",
    "display_name",
    "description",
    "training_type",
    "lifecycle",
    "deployment_environment",
    "stages",
    "parameters",
)
# A lifecycle goes on from the one before it (customized, then complete, then live), so a later one
# may also configure the stages of the earlier ones.
OPTIONAL_STAGES = {
    "customized": ("inference_customized",),
    "complete": ("inference_customized", "inference_complete"),
    "live": ("inference_customized", "inference_complete"),
}
METHOD_NAME_RE = re.compile(r"[a-z0-9_-]{1,64}")
CONDA_ENV_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")
MAX_DISPLAY_NAME = 255
MAX_DESCRIPTION = 4000
MAX_PATH = 1024


def _file_problem(path: str) -> str | None:
    """Stage files are relative paths (from the agent's methods directory) to a .py file."""
    if path != path.strip() or any(ord(c) < 32 for c in path):
        return "must not have surrounding spaces or control characters"
    if len(path) > MAX_PATH:
        return f"must be at most {MAX_PATH} characters"
    if path.startswith(("/", "~")) or "\\" in path or re.match(r"[A-Za-z]:", path):
        return "must be a relative path with / separators (from the methods directory), not an absolute one"
    parts = PurePosixPath(path).parts
    if ".." in parts:
        return "must not contain '..'"
    if not path.endswith(".py") or not parts or parts[-1] == ".py":
        return "must name a Python file ending in .py"
    return None


def _check_stage(errors: ViolationCollector, stage: str, value: Any, *, need_file: str, need_env: str) -> None:
    """Shape of one stage entry; need_file/need_env are the reasons they are required ("" when not)."""
    where = f"definition.stages.{stage}"
    if not isinstance(value, Mapping):
        errors.add(where, 'must be an object {"file": "path/to/file.py", "env": "conda-env-name"}')
        return
    for key in value:
        if key not in ("file", "env"):
            errors.add(f"{where}.{key}", "unknown key; a stage has file and env")
    file, env = value.get("file"), value.get("env")
    has_file = isinstance(file, str) and bool(file.strip())
    has_env = isinstance(env, str) and bool(env.strip())
    if file is not None and not isinstance(file, str):
        errors.add(f"{where}.file", "must be a path to a .py file")
    elif has_file and isinstance(file, str):
        problem = _file_problem(file)
        if problem:
            errors.add(f"{where}.file", problem)
    elif need_file:
        errors.add(f"{where}.file", need_file)
    if env is not None and not isinstance(env, str):
        errors.add(f"{where}.env", "must be a conda environment name")
    elif has_env and isinstance(env, str):
        if not CONDA_ENV_RE.fullmatch(env):
            errors.add(f"{where}.env", "must be a conda environment name: letters, digits, '.', '_', '-', 1-64")
    elif need_env:
        errors.add(f"{where}.env", need_env)


def validate_custom_method(definition: Any) -> list[FieldViolation]:
    """Every problem of an "Add New Method" definition, each naming its field (`definition.stages.training.file`).

    Keys: name (1-64 of a-z, 0-9, - and _, not a built-in id), display_name, description, training_type
    (chat, embedding, vision-language, image-generation), lifecycle (customized, complete, live),
    deployment_environment (live only: builtin or custom), stages and parameters. Stages map a stage
    name to {"file": relative/path.py, "env": conda-env}: every lifecycle needs training; complete and
    live need saving.file too (its env defaults to the training env); live with a custom deployment
    environment needs deployment. inference_customized and inference_complete (also spelled
    inference-customized and inference-complete, as seed 003 does) are optional, and need both file and
    env when given. parameters, when given, is a list of parameter specs (see
    params.parse_param_spec); without it the method takes DeepExtension's generic table.
    No violations guarantees name, training_type, lifecycle and stages.training.file are strings.
    """
    if not isinstance(definition, Mapping):
        return [FieldViolation("definition", "must be an object")]
    errors = ViolationCollector()
    for key in definition:
        if key not in DEFINITION_KEYS:
            errors.add(f"definition.{key}", f"unknown field; expected one of {', '.join(DEFINITION_KEYS)}")

    name = definition.get("name")
    if not isinstance(name, str) or not name.strip():
        errors.add("definition.name", "is required")
    elif not METHOD_NAME_RE.fullmatch(name):
        errors.add("definition.name", "must be 1-64 characters of lowercase letters, digits, '-' and '_'")
    elif name in BUILTIN_IDS:
        errors.add("definition.name", f"{name!r} is a built-in method")
    for key, limit in (("display_name", MAX_DISPLAY_NAME), ("description", MAX_DESCRIPTION)):
        value = definition.get(key)
        if value is not None and (not isinstance(value, str) or len(value) > limit):
            errors.add(f"definition.{key}", f"must be text of at most {limit} characters")
    training_type = definition.get("training_type")
    if training_type is None or training_type == "":
        errors.add("definition.training_type", f"is required: one of {', '.join(TRAINING_TYPES)}")
    elif training_type not in TRAINING_TYPES:
        errors.add("definition.training_type", f"must be one of {', '.join(TRAINING_TYPES)}")
    lifecycle = definition.get("lifecycle")
    if lifecycle is None or lifecycle == "":
        errors.add("definition.lifecycle", f"is required: one of {', '.join(LIFECYCLES)}")
        lifecycle = None
    elif lifecycle not in LIFECYCLES:
        errors.add("definition.lifecycle", f"must be one of {', '.join(LIFECYCLES)}")
        lifecycle = None

    deployment = definition.get("deployment_environment")
    if lifecycle == "live":
        if deployment is None or deployment == "":
            errors.add("definition.deployment_environment", "is required for the live lifecycle: builtin or custom")
        elif deployment not in DEPLOYMENT_ENVIRONMENTS:
            errors.add("definition.deployment_environment", "must be builtin or custom")
    elif deployment is not None and lifecycle is not None:
        errors.add("definition.deployment_environment", "is only used by the live lifecycle")

    _check_stages(errors, definition.get("stages"), lifecycle, deployment)

    parameters = definition.get("parameters")
    if parameters is not None:
        _custom_parameter_specs(parameters, errors)
    return errors.violations


def stage_name(key: str) -> str | None:
    """The stage a definition's key names: seed 003 writes inference-customized for inference_customized."""
    name = key.replace("-", "_")
    return name if name in STAGES else None


def _check_stages(errors: ViolationCollector, given: Any, lifecycle: str | None, deployment: Any) -> None:
    if given is None:
        given = {}
    if not isinstance(given, Mapping):
        errors.add("definition.stages", 'must be an object: {"training": {"file": ..., "env": ...}, ...}')
        return
    # By stage name; violations name the key as the definition spells it (definition.stages.inference-complete).
    stages: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for key, value in given.items():
        stage = stage_name(key) if isinstance(key, str) else None
        if stage is None:
            errors.add(f"definition.stages.{key}", f"unknown stage; expected one of {', '.join(STAGES)}")
        elif stage in stages:
            errors.add(f"definition.stages.{key}", f"names the {stage} stage again (as {spelled[stage]})")
        else:
            stages[stage], spelled[stage] = value, key

    def check(stage: str, need_file: str, need_env: str) -> None:
        _check_stage(errors, spelled[stage], stages[stage], need_file=need_file, need_env=need_env)

    if lifecycle is None:  # requirements depend on it; still check the shape of what is there
        for stage in stages:
            check(stage, need_file="", need_env="")
        return

    required = f"is required for the {lifecycle} lifecycle"
    if "training" in stages:
        check("training", need_file=required, need_env=required)
    else:
        errors.add("definition.stages.training.file", required)
        errors.add("definition.stages.training.env", required)

    if lifecycle in ("complete", "live"):
        if "saving" in stages:  # its env defaults to the training env
            check("saving", need_file=required, need_env="")
        else:
            errors.add("definition.stages.saving.file", required)
    elif "saving" in stages:
        errors.add(f"definition.stages.{spelled['saving']}", f"is not used by the {lifecycle} lifecycle")

    custom_deployment = lifecycle == "live" and deployment == "custom"
    if custom_deployment:
        need = "is required for the live lifecycle with a custom deployment environment"
        if "deployment" in stages:
            check("deployment", need_file=need, need_env=need)
        else:
            errors.add("definition.stages.deployment.file", need)
            errors.add("definition.stages.deployment.env", need)
    elif "deployment" in stages:
        errors.add(
            f"definition.stages.{spelled['deployment']}",
            "is only used by the live lifecycle with deployment_environment custom",
        )

    for stage in ("inference_customized", "inference_complete"):
        if stage not in stages:
            continue
        if stage not in OPTIONAL_STAGES[lifecycle]:
            errors.add(f"definition.stages.{spelled[stage]}", f"is not used by the {lifecycle} lifecycle")
            continue
        need = f"is required when the {stage} stage is given"
        check(stage, need_file=need, need_env=need)


def _custom_parameter_specs(parameters: Any, errors: ViolationCollector) -> list[ParamSpec]:
    if not isinstance(parameters, list):
        errors.add("definition.parameters", "must be a list of parameter specs")
        return []
    specs: list[ParamSpec] = []
    taken: dict[str, int] = {}  # names and aliases -> index of the spec that has them
    for i, data in enumerate(parameters):
        where = f"definition.parameters[{i}]"
        spec, problems = parse_param_spec(data, where)
        errors.violations.extend(problems)
        if spec is None:
            continue
        for key, names in (("name", (spec.name,)), ("aliases", spec.aliases)):
            clash = next((n for n in names if n in taken), None)
            if clash is not None:
                errors.add(f"{where}.{key}", f"{clash!r} is already used by parameters[{taken[clash]}]")
        for n in (spec.name, *spec.aliases):
            taken.setdefault(n, i)
        specs.append(spec)
    return specs


def custom_method_specs(definition: Mapping[str, Any]) -> list[ParamSpec]:
    """The parameter specs of a valid added method: its own, or DeepExtension's generic table (as custom01)."""
    parameters = definition.get("parameters")
    if parameters is None:
        return specs_from_dataclass(DeepExtensionParams)
    errors = ViolationCollector()
    specs = _custom_parameter_specs(parameters, errors)
    errors.raise_if_any()
    return specs


def custom_method_stages(definition: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """The stages of a valid added method by their names (inference-complete is stored as inference_complete),
    with the defaults filled in: saving runs in the training env."""
    stages = {stage_name(key) or key: dict(value) for key, value in (definition.get("stages") or {}).items()}
    if "saving" in stages and not stages["saving"].get("env"):
        stages["saving"]["env"] = stages["training"]["env"]
    return stages

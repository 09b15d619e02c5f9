"""A tiny randomly initialised Llama model plus a byte-level BPE tokenizer, for tests and smoke runs.

Built entirely offline from the bundled corpus in a few seconds; the same seed gives the same files.

    python -m tuneforge_trainer.tiny_model OUTPUT_DIR [--seed N] [--force]
"""

from __future__ import annotations

import argparse
from pathlib import Path

CORPUS = Path(__file__).parent / "data" / "corpus.txt"
VOCAB_SIZE = 1024
MAX_LENGTH = 1024

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [UNK, BOS, EOS, PAD, IM_START, IM_END]

# ChatML. The {% generation %} markers let TRL's assistant_only_loss mask everything but assistant
# turns (transformers' return_assistant_tokens_mask); <|im_end|> sits inside them so the model learns to stop.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}"
    "{%- else %}"
    "{{- message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    lines = CORPUS.read_text(encoding="utf-8").splitlines(keepends=True)
    backend.train_from_iterator(lines, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        extra_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE,
        model_max_length=MAX_LENGTH,
        padding_side="right",
    )


def build_tiny_model(output_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny float32 Llama (safetensors) and its tokenizer to output_dir; return the path."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    output_dir = Path(output_dir)
    tokenizer = build_tokenizer()
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS}
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_LENGTH,
        tie_word_embeddings=True,
        bos_token_id=ids[BOS],
        eos_token_id=ids[EOS],
        pad_token_id=ids[PAD],
        dtype="float32",
    )
    # fork_rng: the fixed seed must not leak into the caller's global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).float()
    # Chat replies end with <|im_end|>, plain text with </s>: stop on either.
    model.generation_config = GenerationConfig(
        bos_token_id=ids[BOS],
        eos_token_id=[ids[EOS], ids[IM_END]],
        pad_token_id=ids[PAD],
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tuneforge_trainer.tiny_model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even if OUTPUT_DIR/config.json exists")
    args = parser.parse_args(argv)
    if (args.output_dir / "config.json").exists() and not args.force:
        print(f"{args.output_dir} already holds a model; use --force to rebuild")
        return 0
    from transformers.utils import logging

    logging.disable_progress_bar()  # keep the CLI output to one line
    path = build_tiny_model(args.output_dir, seed=args.seed)
    print(f"tiny model written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

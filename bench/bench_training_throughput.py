"""Training throughput and memory: the platform's sft-lora runner vs a bare TRL SFTTrainer script, side by side.

A random Llama (built offline from the trainer's tiny-model tokenizer, made big enough that compute dominates a
step on a CPU) and a synthetic chat dataset with a wide length spread (rows of one or two turns cut from the
bundled corpus, a few to several hundred tokens each; its length statistics are printed) are written to a
temporary directory. Four training runs are then repeated `--repeats` times, in rotating order, each as a child
process that pays its own start and model load, all on the CPU (CUDA_VISIBLE_DEVICES is emptied):

  platform         python -m tuneforge_trainer.methods.sft_lora with its default parameters (packing on,
                   best-fit padding-free; no activation checkpointing; loss on assistant turns)
  platform-padded  the same with --packing=false (each batch padded to its longest sample)
  bare-same        bench/_bare_trl_sft.py: SFTConfig + LoraConfig(all-linear), the platform's choices set
                   (packing=True bfd, gradient_checkpointing=False, assistant_only_loss=True)
  bare-defaults    the same script with TRL's defaults for everything the user did not set
                   (gradient_checkpointing=True, packing=False)

All four share the model, data, LoRA rank/alpha/dropout, batch size, max length, steps, learning rate, seed and
fp32 precision, and the same thread count (--threads; OMP_NUM_THREADS/MKL_NUM_THREADS in each child). One
thread by default: on a shared 2-core machine two OpenMP threads per child spin against other load and made the
same forward/backward about 4x slower and erratic.

Tokens/s is the training loop's own figure from each run's final report: Trainer's non-padding token count
(`include_num_input_tokens_seen="non_padding"`: the attention-mask sum of each batch, or its non-pad tokens when
padding-free) divided by Trainer's `train_runtime` (from just before the first batch is fetched to the end of
the last step: process start, imports, model load, tokenization and saving are excluded). The platform reports
both in its last `[log_data]` line, the bare script in its `bench-result` line. Peak memory is each child's peak
resident set size, ru_maxrss from os.wait4 (the whole process: imports, model load, tokenization, training,
saving). A run's figure is the median of its repeats; every repeat is listed too.

With PyTorch SDPA attention (CPU, or a GPU without --flash_attention), TRL's padding-free collator concatenates
a packed batch into one row of up to batch_size x max_length tokens, so attention runs over that whole row
under a block-diagonal mask, (B*L)^2 rather than B*L^2. The platform gives each packed sequence its own row
instead (tuneforge_trainer.supervised.RowPerPackedSequence); bare-same keeps TRL's joined row, which is most
of the difference in the same-settings figure.

Liger kernels on vs off and QLoRA vs LoRA memory are written as figures without a value (NaN, met None) and a
note saying why: Liger's kernels are Triton GPU kernels and 4-bit loading needs bitsandbytes on CUDA, while
this benchmark trains on the CPU.

    python bench/bench_training_throughput.py [--quick | --large] [--repeats N] [--steps N] [--threads N]
        [--json PATH] [--figures PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from _support import Figure, add_figures_argument, write_figures  # bench/ is the script's directory

BENCH = Path(__file__).resolve().parent
BARE_SCRIPT = BENCH / "_bare_trl_sft.py"
RESULT_PREFIX = "bench-result: "  # the bare script's line


@dataclass(frozen=True)
class Size:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    rows: int
    max_length: int
    batch_size: int
    steps: int
    repeats: int


# About 4-5 minutes on a 2-core machine (12 child processes, most of each one's time in start and model load).
DEFAULT = Size(
    hidden=256,
    layers=4,
    heads=4,
    kv_heads=2,
    intermediate=768,
    rows=400,
    max_length=512,
    batch_size=4,
    steps=10,
    repeats=3,
)
# Longer training loops, so the start of each run weighs less (about 15 minutes on 2 cores).
LARGE = Size(
    hidden=384,
    layers=6,
    heads=6,
    kv_heads=2,
    intermediate=1152,
    rows=800,
    max_length=1024,
    batch_size=4,
    steps=12,
    repeats=3,
)
# The trainer's tiny model as built (64 hidden, 2 layers): the shape of the output, not a measurement.
QUICK = Size(
    hidden=64,
    layers=2,
    heads=4,
    kv_heads=2,
    intermediate=128,
    rows=48,
    max_length=128,
    batch_size=2,
    steps=2,
    repeats=1,
)

BENCH_NAME = "bench_training_throughput"
RUNS = ("platform", "bare-same", "bare-defaults", "platform-padded")
SCENARIOS = (
    # (name, baseline run, platform run, goal)
    ("1. same settings: platform sft-lora vs bare TRL script", "bare-same", "platform", 1.0),
    ("2. defaults: platform vs TRL SFTConfig defaults", "bare-defaults", "platform", 1.3),
    ("3. packing vs padding (platform runner)", "platform-padded", "platform", 1.4),
)
FIGURE_NAMES = (
    "training tokens/s, same settings: platform sft-lora / bare TRL script",
    "training tokens/s, defaults: platform sft-lora / bare TRL script with TRL's defaults",
    "training tokens/s, variable-length chat: packing (padding-free) / padded",
)
MEMORY_GOAL = 1.1  # platform peak RSS / bare script's, same settings


# --- model and data ---------------------------------------------------------------------------------------


def build_model(directory: Path, size: Size) -> dict[str, Any]:
    """The tiny model's tokenizer and chat template with a Llama of `size` (random, fp32); returns its shape."""
    import torch
    import transformers
    from transformers import AutoConfig, GenerationConfig, LlamaForCausalLM

    from tuneforge_trainer.tiny_model import build_tiny_model

    transformers.utils.logging.disable_progress_bar()

    build_tiny_model(directory, seed=0)
    config = AutoConfig.from_pretrained(directory)
    config.update(
        dict(
            hidden_size=size.hidden,
            intermediate_size=size.intermediate,
            num_hidden_layers=size.layers,
            num_attention_heads=size.heads,
            num_key_value_heads=size.kv_heads,
        )
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).float()
    model.generation_config = GenerationConfig.from_pretrained(directory)
    model.save_pretrained(directory)
    parameters = sum(p.numel() for p in model.parameters())
    return {"hidden": size.hidden, "layers": size.layers, "heads": size.heads, "parameters": parameters}


def _sentences() -> list[str]:
    from tuneforge_trainer.tiny_model import CORPUS

    text = CORPUS.read_text(encoding="utf-8")
    return [s.strip() for s in re.split(r"(?<=[.!?\"])\s+", text) if len(s.split()) >= 3]


def _reply(rng: random.Random, sentences: list[str]) -> str:
    if rng.random() < 0.15:  # short answers: a few words
        return " ".join(rng.choice(sentences).split()[: rng.randint(1, 5)])
    count = max(1, round(2 ** rng.uniform(0, 4)))  # 1 to 16 sentences, log-uniform: most of them short
    start = rng.randrange(len(sentences))
    return " ".join(sentences[(start + i) % len(sentences)] for i in range(count))


def write_chat_dataset(path: Path, rows: int, seed: int = 0) -> None:
    """`rows` chat rows of one or two turns, lengths spread from a few tokens to several hundred."""
    rng, sentences = random.Random(seed), _sentences()
    with path.open("w", encoding="utf-8") as f:
        for _ in range(rows):
            messages = []
            if rng.random() < 0.1:
                messages.append({"role": "system", "content": "Answer plainly."})
            for _turn in range(rng.choice((1, 1, 1, 2))):  # a quarter of the rows have two turns
                question = rng.choice(sentences)
                if rng.random() < 0.3:
                    question = " ".join(question.split()[: rng.randint(2, 6)]) + "?"
                messages += [
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": _reply(rng, sentences)},
                ]
            f.write(json.dumps({"messages": messages}) + "\n")


def dataset_stats(path: Path, model_dir: Path, max_length: int) -> dict[str, Any]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.model_max_length = 1 << 30  # counting only: no warning for rows the runs will truncate
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    lengths = sorted(
        len(tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"]) for r in rows
    )
    return {
        "rows": len(rows),
        "tokens_min": lengths[0],
        "tokens_median": int(statistics.median(lengths)),
        "tokens_mean": round(statistics.fmean(lengths), 1),
        "tokens_p90": lengths[int(0.9 * (len(lengths) - 1))],
        "tokens_max": lengths[-1],
        "rows_truncated": sum(n > max_length for n in lengths),
    }


# --- runs ---------------------------------------------------------------------------------------------------


@dataclass
class Run:
    name: str
    repeat: int
    tokens: int
    train_runtime: float
    wall_s: float  # the whole child process: start, load, tokenize, train, save
    peak_rss_mib: float  # the child's ru_maxrss

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.train_runtime


def child_env(tmp: Path, threads: int) -> dict[str, str]:
    """Offline, on the CPU, the same threads for every child, one datasets cache, no stray runner parameters."""
    from tuneforge_common.methods import SftLoraParams, env_name, param_fields

    drop = {env_name(f.name) for f in param_fields(SftLoraParams)}
    drop |= {"MODEL_PATH", "DATASET_PATH", "OUTPUT_DIR", "RESUME_FROM_CHECKPOINT"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        # On a GPU machine the runner would pick CUDA and bf16 while the bare script stays fp32.
        CUDA_VISIBLE_DEVICES="",
        # Shared by all runs so later repeats reuse the tokenized dataset (outside the measured loop anyway).
        HF_DATASETS_CACHE=str(tmp / "datasets-cache"),
    )
    return env


def command(name: str, model: Path, data: Path, output: Path, size: Size) -> list[str]:
    if name.startswith("platform"):
        return [
            sys.executable,
            "-m",
            "tuneforge_trainer.methods.sft_lora",
            f"--model_path={model}",
            f"--dataset_path={data}",
            f"--output_dir={output}",
            f"--max_steps={size.steps}",
            f"--batch_size={size.batch_size}",
            f"--max_seq_length={size.max_length}",
            "--learning_rate=2e-4",
            *(["--packing=false"] if name == "platform-padded" else []),
        ]
    choices = ["--packing=true", "--gradient_checkpointing=false", "--assistant_only_loss=true"]
    return [
        sys.executable,
        str(BARE_SCRIPT),
        f"--model={model}",
        f"--data={data}",
        f"--output={output}",
        f"--max_steps={size.steps}",
        f"--batch_size={size.batch_size}",
        f"--max_length={size.max_length}",
        "--learning_rate=2e-4",
        *(choices if name == "bare-same" else []),
    ]


def final_report(name: str, stdout: str) -> dict[str, Any]:
    """train_runtime and num_input_tokens_seen from the run's last report line."""
    from tuneforge_trainer.sdk import parse_log_data

    for line in reversed(stdout.splitlines()):
        if name.startswith("platform"):
            payload = parse_log_data(line)
            if payload and "train_runtime" in payload["details"]:
                return payload["details"]
        elif line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    raise RuntimeError(f"{name}: no final report with train_runtime on stdout")


def run_once(name: str, repeat: int, tmp: Path, model: Path, data: Path, size: Size, env: dict[str, str]) -> Run:
    output = tmp / f"out-{name}-{repeat}"
    stdout_path, stderr_path = tmp / f"{name}-{repeat}.stdout", tmp / f"{name}-{repeat}.stderr"
    started = time.perf_counter()
    with stdout_path.open("w") as stdout, stderr_path.open("w") as stderr:
        proc = subprocess.Popen(command(name, model, data, output, size), env=env, stdout=stdout, stderr=stderr)
        # wait4 rather than proc.wait(): it also returns the child's resource usage, whose ru_maxrss (KiB on
        # Linux) is its peak RSS.
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = stderr_path.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"{name} exited with {proc.returncode}:\n{tail}")
    report = final_report(name, stdout_path.read_text(errors="replace"))
    tokens, runtime = int(report["num_input_tokens_seen"]), float(report["train_runtime"])
    return Run(name, repeat, tokens, runtime, wall, usage.ru_maxrss / 1024)


# --- report -------------------------------------------------------------------------------------------------


def _median(runs: list[Run], name: str, value: Callable[[Run], float]) -> float:
    return statistics.median(value(r) for r in runs if r.name == name)


def summarise(runs: list[Run]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The tokens/s scenarios (ratio of medians) and the peak-memory comparison at the same settings."""
    median = {name: _median(runs, name, lambda r: r.tokens_per_s) for name in RUNS}
    best = {name: max(r.tokens_per_s for r in runs if r.name == name) for name in RUNS}
    scenarios = []
    for label, baseline, platform, goal in SCENARIOS:
        ratio = median[platform] / median[baseline]
        scenarios.append(
            {
                "scenario": label,
                "baseline": baseline,
                "platform": platform,
                "baseline_tokens_per_s": round(median[baseline], 1),
                "platform_tokens_per_s": round(median[platform], 1),
                "ratio": round(ratio, 3),
                "ratio_of_best": round(best[platform] / best[baseline], 3),  # for reference
                "goal": goal,
                "met": ratio >= goal,
            }
        )
    rss = {name: _median(runs, name, lambda r: r.peak_rss_mib) for name in RUNS}
    ratio = rss["platform"] / rss["bare-same"]
    memory = {
        "baseline": "bare-same",
        "platform": "platform",
        "peak_rss_mib": {name: round(value, 1) for name, value in rss.items()},
        "ratio": round(ratio, 3),
        "goal": MEMORY_GOAL,
        "met": ratio <= MEMORY_GOAL,
    }
    return scenarios, memory


def gpu_only_notes() -> dict[str, str]:
    """Why Liger on/off and QLoRA vs LoRA are not measured by this run, from what this machine has."""
    import importlib.util

    import torch

    def have(module: str) -> str:
        return "installed" if importlib.util.find_spec(module) else "not installed"

    machine = "this machine has a CUDA GPU" if torch.cuda.is_available() else "this machine has no CUDA GPU"
    machine += f" (torch {torch.__version__}), and this benchmark trains on the CPU"
    return {
        "liger": (
            "not measurable here: Liger's kernels are Triton GPU kernels (the runner refuses "
            f"--use_liger_kernel without CUDA); {machine}; liger-kernel {have('liger_kernel')}, "
            f"triton {have('triton')}"
        ),
        "qlora": (
            "not measurable here: 4-bit NF4 loading needs bitsandbytes on a CUDA GPU (the qlora runner refuses "
            f"--load_in_4bit without CUDA); {machine}; bitsandbytes {have('bitsandbytes')}"
        ),
    }


def figures(info: dict[str, Any], scenarios: list[dict[str, Any]], memory: dict[str, Any]) -> list[Figure]:
    m, d, s = info["model"], info["dataset"], info["settings"]
    settings = (
        f"CPU, {s['threads']} thread(s) per run; random Llama {m['hidden']}x{m['layers']} "
        f"({m['parameters'] / 1e6:.1f}M parameters), fp32, LoRA r=8 all-linear; {s['steps']} steps, batch "
        f"{s['batch_size']}, max_length {s['max_length']}; {d['rows']} synthetic chat rows of "
        f"{d['tokens_min']}-{d['tokens_max']} tokens (median {d['tokens_median']}); median of {s['repeats']} "
        "repeat(s), each run its own process"
    )
    result = []
    for sc, what in zip(scenarios, FIGURE_NAMES, strict=True):
        result.append(
            Figure(
                BENCH_NAME,
                what,
                sc["ratio"],
                "x",
                baseline=f"{sc['baseline']} {sc['baseline_tokens_per_s']:,.0f} tok/s; "
                f"{sc['platform']} {sc['platform_tokens_per_s']:,.0f} tok/s",
                goal=f">= {sc['goal']:.1f}x",
                met=sc["met"],
                note=settings,
            )
        )
    rss = memory["peak_rss_mib"]
    result.append(
        Figure(
            BENCH_NAME,
            "peak memory: platform sft-lora / bare TRL script, same settings",
            memory["ratio"],
            "x",
            baseline=f"bare-same {rss['bare-same']:,.0f} MiB; platform {rss['platform']:,.0f} MiB peak RSS",
            goal=f"<= {memory['goal']:.1f}x",
            met=memory["met"],
            note="peak RSS of each child process (ru_maxrss from os.wait4: imports, model load, tokenization, "
            "training and saving), median of the repeats",
        )
    )
    notes = info["not_measured"]
    result += [
        Figure(
            BENCH_NAME,
            "Liger kernels on / off (platform sft-lora tokens/s)",
            float("nan"),
            "x",
            baseline="not run",
            note=notes["liger"],
        ),
        Figure(
            BENCH_NAME,
            "peak GPU memory: QLoRA (4-bit base) / LoRA",
            float("nan"),
            "x",
            baseline="not run",
            note=notes["qlora"],
        ),
    ]
    return result


def print_report(info: dict[str, Any], runs: list[Run], scenarios: list[dict[str, Any]], memory: dict) -> None:
    m, d, s = info["model"], info["dataset"], info["settings"]
    print(
        f"model: random Llama, {m['hidden']} hidden x {m['layers']} layers, {m['parameters']:,} parameters, fp32; "
        f"LoRA r=8 alpha=16 all-linear"
    )
    print(
        f"data: {d['rows']} chat rows, tokens per row min {d['tokens_min']} / median {d['tokens_median']} / "
        f"mean {d['tokens_mean']} / p90 {d['tokens_p90']} / max {d['tokens_max']} "
        f"({d['rows_truncated']} over max_length {s['max_length']})"
    )
    print(
        f"runs: {s['steps']} steps, batch {s['batch_size']}, max_length {s['max_length']}, lr 2e-4, CPU, "
        f"{s['threads']} thread(s) each, {s['repeats']} repeat(s) in rotating order; figure = median of repeats"
    )
    print("tokens/s = non-padding tokens trained (Trainer's count) / train_runtime (Trainer's training loop)")
    print("peak RSS = ru_maxrss of each child process (os.wait4)\n")
    print("| run | tokens/s per repeat | tokens | train_runtime s | process wall s | peak RSS MiB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in RUNS:
        mine = [r for r in runs if r.name == name]
        rates = ", ".join(f"{r.tokens_per_s:,.0f}" for r in mine)
        runtimes = ", ".join(f"{r.train_runtime:.1f}" for r in mine)
        walls = ", ".join(f"{r.wall_s:.1f}" for r in mine)
        rss = ", ".join(f"{r.peak_rss_mib:,.0f}" for r in mine)
        print(f"| {name} | {rates} | {mine[0].tokens:,} | {runtimes} | {walls} | {rss} |")
    print()
    print("| scenario | baseline | baseline tok/s | platform tok/s | ratio | goal | met |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for sc in scenarios:
        print(
            f"| {sc['scenario']} | {sc['baseline']} | {sc['baseline_tokens_per_s']:,.1f} | "
            f"{sc['platform_tokens_per_s']:,.1f} | {sc['ratio']:.3f}x | >= {sc['goal']:.1f}x | "
            f"{'met' if sc['met'] else 'missed'} |"
        )
    rss = memory["peak_rss_mib"]
    print(
        f"| 4. peak RSS, same settings: platform vs bare TRL script | bare-same | {rss['bare-same']:,.0f} MiB | "
        f"{rss['platform']:,.0f} MiB | {memory['ratio']:.3f}x | <= {memory['goal']:.1f}x | "
        f"{'met' if memory['met'] else 'missed'} |"
    )
    print()
    for key, label in (("liger", "Liger kernels on vs off"), ("qlora", "QLoRA vs LoRA memory")):
        print(f"{label}: {info['not_measured'][key]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--quick", action="store_true", help="the tiny model, a few rows and steps, one repeat")
    sizes.add_argument("--large", action="store_true", help="a bigger model, longer rows and more steps")
    parser.add_argument("--json", type=Path, help="also write the settings, every run and the table here")
    parser.add_argument("--repeats", type=int, help="repeats of each run (default 3, 1 with --quick)")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default 10, 2 with --quick)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of each child (the same for all)")
    add_figures_argument(parser)
    args = parser.parse_args()
    size = QUICK if args.quick else LARGE if args.large else DEFAULT
    if args.repeats:
        size = Size(**{**asdict(size), "repeats": args.repeats})
    if args.steps:
        size = Size(**{**asdict(size), "steps": args.steps})

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tuneforge-bench-train-") as tmp_name:
        tmp = Path(tmp_name)
        model_dir, data = tmp / "model", tmp / "chat.jsonl"
        model_info = build_model(model_dir, size)
        write_chat_dataset(data, size.rows)
        info = {
            "model": model_info,
            "dataset": dataset_stats(data, model_dir, size.max_length),
            "settings": {**asdict(size), "threads": args.threads, "quick": args.quick, "large": args.large},
            "not_measured": gpu_only_notes(),
        }
        env = child_env(tmp, args.threads)
        runs = []
        for repeat in range(size.repeats):
            shift = repeat % len(RUNS)
            for name in RUNS[shift:] + RUNS[:shift]:  # rotating order: no run always goes first
                runs.append(run_once(name, repeat, tmp, model_dir, data, size, env))
                print(
                    f"  {name} #{repeat + 1}: {runs[-1].tokens_per_s:,.0f} tok/s, "
                    f"{runs[-1].peak_rss_mib:,.0f} MiB peak RSS",
                    file=sys.stderr,
                    flush=True,
                )
    scenarios, memory = summarise(runs)
    print_report(info, runs, scenarios, memory)
    print(f"\nbenchmark wall time {time.perf_counter() - started:.0f} s")
    if args.json:
        payload = {
            **info,
            "runs": [{**asdict(r), "tokens_per_s": round(r.tokens_per_s, 1)} for r in runs],
            "scenarios": scenarios,
            "memory": memory,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    write_figures(args.figures, figures(info, scenarios, memory))


if __name__ == "__main__":
    main()

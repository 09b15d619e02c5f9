"""The saving stage of a DeepExtension-style method: what its training saved, made into the complete model.

Nothing here knows TuneForge either. After the training exits 0 the platform runs this file (lifecycle
complete or live) with --model_path (the base model), --adapter_path (the training's output directory)
and --output_dir (where the complete model goes), plus the job's parameters as flags it may ignore.

A LoRA adapter (adapter_config.json in --adapter_path) is merged into the base with PEFT
(merge_and_unload). train.py here fine-tunes the whole model, so its output is a full model already: it
is loaded (checked against the base: same architecture, same tensors) and saved as the complete one.
Either way the result is saved with save_pretrained, tokenizer included, and one `[log_data]` line says
how many tensors the training changed.

Register it with the training file:
    {"name": "de-style-complete", "training_type": "chat", "lifecycle": "complete",
     "stages": {"training": {"file": "deepextension_style/train.py", "env": "<conda env name>"},
                "saving": {"file": "deepextension_style/save.py"}}}
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_path", required=True)
    parser.add_argument("--adapter_path", required=True)
    parser.add_argument("--output_dir", required=True)
    args, _ = parser.parse_known_args()  # the job's parameters come too; this file needs none of them
    return args


def main() -> None:
    args = parse_args()
    trained = Path(args.adapter_path)
    if not trained.is_dir():
        sys.exit(f"error: --adapter_path {trained} is not a directory")
    base = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=torch.float32)
    before = {name: tensor.clone() for name, tensor in base.state_dict().items()}
    if (trained / "adapter_config.json").is_file():
        from peft import PeftModel

        model = PeftModel.from_pretrained(base, str(trained)).merge_and_unload()
        how = "merged the LoRA adapter into the base"
    elif (trained / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(str(trained), dtype=torch.float32)
        if type(model) is not type(base) or set(model.state_dict()) != set(before):
            sys.exit(f"error: the model in {trained} is not a fine-tuned {type(base).__name__} of {args.model_path}")
        how = "loaded the fully fine-tuned model"
    else:
        sys.exit(f"error: {trained} holds neither an adapter (adapter_config.json) nor a model (config.json)")
    after = model.state_dict()
    changed = sum(not torch.equal(before[name], after[name]) for name in before if name in after)

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer_source = trained if (trained / "tokenizer_config.json").is_file() else Path(args.model_path)
    AutoTokenizer.from_pretrained(str(tokenizer_source)).save_pretrained(out)
    print(f"{how}; saved the complete model to {out}", flush=True)
    details = {"tensors": len(after), "tensors_changed": changed}
    print("[log_data]: " + json.dumps({"code": 200, "progress": 100.0, "details": details}), flush=True)


if __name__ == "__main__":
    main()

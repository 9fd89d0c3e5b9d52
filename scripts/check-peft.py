"""Reads a checkpoint of a `frugal train --optimizer lora` run with `transformers` and PEFT, and
checks that PEFT applies the adapter frugal wrote: the adapted logits differ from the base
model's and equal those of the weights with (lora_alpha / r)·B·A added by hand.

  python3 -m venv /tmp/refenv && /tmp/refenv/bin/pip install torch transformers peft
  /tmp/refenv/bin/python scripts/check-peft.py runs/run-N/checkpoints/step-M
"""

import json
import os
import shutil
import sys
import tempfile

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

checkpoint = sys.argv[1]
# The base model alone: transformers would attach the adapter found beside the weights.
base_dir = tempfile.mkdtemp()
for name in ["config.json", "model.safetensors"]:
    shutil.copy(os.path.join(checkpoint, name), base_dir)


def load_base():
    return LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()


config = json.load(open(os.path.join(checkpoint, "adapter_config.json")))
adapters = load_file(os.path.join(checkpoint, "adapter_model.safetensors"))
torch.manual_seed(0)
ids = torch.randint(0, load_base().config.vocab_size, (2, 48))
with torch.no_grad():
    base = load_base()(input_ids=ids).logits
    merged_model = load_base()
    weights = merged_model.state_dict()
    for name, a in adapters.items():
        if ".lora_A." in name:
            b = adapters[name.replace(".lora_A.", ".lora_B.")]
            weight = name.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
            weights[weight] += config["lora_alpha"] / config["r"] * b @ a
    merged_model.load_state_dict(weights)
    merged = merged_model(input_ids=ids).logits
    adapted = PeftModel.from_pretrained(load_base(), checkpoint).eval()(input_ids=ids).logits
shutil.rmtree(base_dir)
apart = (adapted - base).abs().max().item()
off = (adapted - merged).abs().max().item()
print(f"{len(adapters)} adapter tensors; PEFT's logits move {apart:.3g} from the base model's "
      f"and differ by {off:.3g} from the merged weights'")
sys.exit(0 if apart > 1e-3 and off < 1e-4 else 1)

"""Reference outputs of Hugging Face `transformers` LLaMA models, for frugal-nn's loading tests.

Writes into crates/frugal-nn/tests/fixtures/:
  tiny-llama/        a small random LlamaForCausalLM with grouped-query attention, saved by
                     save_pretrained in shards (model-0000N-of-0000M.safetensors and
                     model.safetensors.index.json), and expected.json: token ids, the logits
                     and the mean next-token loss;
  tiny-llama-tied/   the same with tie_word_embeddings (no lm_head.weight in the file);
  tiny-llama-lora/   a LlamaForCausalLM (model.safetensors) with a PEFT LoRA adapter on q_proj
                     and v_proj beside it (adapter_config.json, adapter_model.safetensors, as
                     PeftModel.save_pretrained writes them), and the adapted model's expected.json.

Made with (any machine with PyPI access; nothing here runs at frugal's run time):
  python3 -m venv /tmp/refenv && /tmp/refenv/bin/pip install torch==2.15.0 transformers==5.24.0 peft==0.21.2
  /tmp/refenv/bin/python scripts/make-llama-fixtures.py [FIXTURE ...]   # all of them by default
"""

import json
import os
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

OUT = os.path.join(os.path.dirname(__file__), "..", "crates", "frugal-nn", "tests", "fixtures")


def model_of(tied):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                         num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                         max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=10000.0,
                         initializer_range=0.3,
                         tie_word_embeddings=tied)
    model = LlamaForCausalLM(config).eval()
    # Random norms, so that a norm read from the wrong tensor shows (and weights large enough
    # that every part of the model moves the logits).
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return model


def expect(model, folder):
    ids = torch.tensor([[1, 5, 9, 33, 2, 60, 7, 7, 12, 40], [3, 3, 8, 21, 55, 0, 19, 4, 30, 11]])
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    expected = {
        "ids": ids.tolist(),
        "logits": [round(float(x), 7) for x in out.logits.flatten().tolist()],
        "loss": float(out.loss),
    }
    with open(os.path.join(folder, "expected.json"), "w") as f:
        json.dump(expected, f)
    print(os.path.basename(folder), sorted(os.listdir(folder)))


def write(name, tied):
    model = model_of(tied)
    folder = os.path.join(OUT, name)
    model.save_pretrained(folder, max_shard_size="40KB", safe_serialization=True)
    os.remove(os.path.join(folder, "generation_config.json"))  # not read
    expect(model, folder)


def write_lora(name):
    from peft import LoraConfig, get_peft_model

    model = model_of(False)
    folder = os.path.join(OUT, name)
    model.save_pretrained(folder, safe_serialization=True)
    os.remove(os.path.join(folder, "generation_config.json"))
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                        task_type="CAUSAL_LM")
    adapted = get_peft_model(model, config).eval()
    # Trained-looking adapters: B is zero at PEFT's start, which would hide a misread adapter.
    with torch.no_grad():
        for n, p in adapted.named_parameters():
            if "lora_" in n:
                p.copy_(0.5 * torch.randn_like(p))
    adapted.save_pretrained(folder)
    for extra in ["README.md"]:
        if os.path.exists(os.path.join(folder, extra)):
            os.remove(os.path.join(folder, extra))
    expect(adapted, folder)


FIXTURES = {
    "tiny-llama": lambda: write("tiny-llama", tied=False),
    "tiny-llama-tied": lambda: write("tiny-llama-tied", tied=True),
    "tiny-llama-lora": lambda: write_lora("tiny-llama-lora"),
}
for name in sys.argv[1:] or list(FIXTURES):
    FIXTURES[name]()

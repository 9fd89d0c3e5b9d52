"""PyTorch twin of `frugal train`'s step, for speed comparisons: the same LLaMA (token embedding,
N x (RMSNorm, causal attention with rotate-half RoPE, RMSNorm, SwiGLU), final RMSNorm, untied head),
the same loss, AdamW (fused where the device allows), eager mode, on random tokens.

Prints one line: `torch MODEL DEVICE DTYPE batch B x T: median S ms/step, N tok/s`.

    python3 scripts/torch-llama-twin.py --model 60m --device cuda --batch-size 32 --steps 20
"""

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F

# The built-in shapes of frugal's `LlamaConfig::builtin`: vocab, hidden, intermediate, heads, layers.
SHAPES = {
    "tiny": (4096, 256, 688, 4, 2),
    "9m": (32000, 128, 352, 4, 4),
    "20m": (32000, 256, 688, 4, 4),
    "35m": (32000, 384, 1024, 8, 6),
    "60m": (32000, 512, 1376, 8, 8),
    "130m": (32000, 768, 2048, 12, 12),
    "350m": (32000, 1024, 2736, 16, 24),
    "1b": (32000, 2048, 5461, 32, 24),
}
EPS = 1e-6
THETA = 10000.0


class RMSNorm(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(d))

    def forward(self, x):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)
        return (y * self.weight.float()).to(x.dtype)


def rope(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Layer(torch.nn.Module):
    def __init__(self, hidden, inter, heads):
        super().__init__()
        self.heads = heads
        self.input_norm = RMSNorm(hidden)
        self.q = torch.nn.Linear(hidden, hidden, bias=False)
        self.k = torch.nn.Linear(hidden, hidden, bias=False)
        self.v = torch.nn.Linear(hidden, hidden, bias=False)
        self.o = torch.nn.Linear(hidden, hidden, bias=False)
        self.post_norm = RMSNorm(hidden)
        self.gate = torch.nn.Linear(hidden, inter, bias=False)
        self.up = torch.nn.Linear(hidden, inter, bias=False)
        self.down = torch.nn.Linear(inter, hidden, bias=False)

    def forward(self, x, cos, sin):
        b, t, h = x.shape
        d = h // self.heads
        y = self.input_norm(x)
        split = lambda z: z.view(b, t, self.heads, d).transpose(1, 2)
        q = rope(split(self.q(y)), cos, sin)
        k = rope(split(self.k(y)), cos, sin)
        v = split(self.v(y))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(att.transpose(1, 2).reshape(b, t, h))
        y = self.post_norm(x)
        return x + self.down(F.silu(self.gate(y)) * self.up(y))


class Llama(torch.nn.Module):
    def __init__(self, vocab, hidden, inter, heads, layers):
        super().__init__()
        self.heads = heads
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.layers = torch.nn.ModuleList(Layer(hidden, inter, heads) for _ in range(layers))
        self.norm = RMSNorm(hidden)
        self.head = torch.nn.Linear(hidden, vocab, bias=False)
        for p in self.parameters():
            if p.dim() == 2:
                torch.nn.init.normal_(p, std=0.02)

    def tables(self, t, device, dtype):
        d = self.embed.embedding_dim // self.heads
        inv = 1.0 / THETA ** (torch.arange(0, d // 2, device=device).float() * 2 / d)
        angles = torch.arange(t, device=device).float()[:, None] * inv[None, :]
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def forward(self, ids, targets, dtype):
        cos, sin = self.tables(ids.shape[1], ids.device, dtype)
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x, cos, sin)
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="60m", choices=sorted(SHAPES))
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    torch.manual_seed(0)
    model = Llama(*SHAPES[a.model]).to(device)
    # The fused AdamW kernel runs on CUDA and, for f32 parameters, on the CPU.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0, fused=True)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    vocab = SHAPES[a.model][0]
    times = []
    for step in range(a.steps):
        ids = torch.randint(0, vocab, (a.batch_size, a.seq_len + 1), device=device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=a.dtype == "bf16"):
            loss = model(ids[:, :-1], ids[:, 1:], dtype)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        if not math.isfinite(loss.item()):
            raise SystemExit(f"non-finite loss at step {step}")
    median = statistics.median(times[2:] if len(times) > 4 else times)
    tokens = a.batch_size * a.seq_len
    print(
        f"torch {a.model} {a.device} {a.dtype} batch {a.batch_size} x {a.seq_len}: "
        f"median {median * 1e3:.1f} ms/step, {tokens / median:.0f} tok/s"
    )


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Training parity: the same small GPT trained twice from the same seed on the same batches, once with cce's loss
and once with materialised logits (fp32 GEMM of the bf16 inputs, softcap, F.cross_entropy); prints the largest loss
difference, the peak memory and the step time of both and plots both loss curves. Training in bf16 is chaotic (a
rounding difference can trigger a loss spike in one run and not the other), so the pair is trained for several
seeds (--seeds): the difference between the methods is to be read against the spread between seeds.

Model: 6 layers, d_model 512, 8 heads, context 256, untied classifier initialised to zero, logit softcap 30, bf16
autocast. Data: data/corpus.txt (scripts/fetch_corpus.sh: the King James Bible and the fortune collection),
tokenised by a word-level vocabulary of 32,768 entries built here: the most frequent words and punctuation marks,
plus single characters, which spell the words outside it.

  python3 bench/train_parity.py --steps 300 --out parity/
"""

import argparse
import collections
import json
import math
import pathlib
import re
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "python"))

TOKEN = re.compile(r"[A-Za-z]+|[0-9]|[^\sA-Za-z0-9]")


def build_tokens(text, vocab_size):
    """Word-level vocabulary: every character of the corpus, then the most frequent words up to vocab_size."""
    pieces = TOKEN.findall(text)
    chars = sorted(set(text) - set(" \t\r\n"))
    words = [w for w, _ in collections.Counter(p for p in pieces if len(p) > 1).most_common(vocab_size - len(chars))]
    vocab = {t: i for i, t in enumerate(chars + words)}
    ids = []
    for p in pieces:
        ids.extend([vocab[p]] if p in vocab else [vocab[ch] for ch in p])
    return torch.tensor(ids, dtype=torch.int64), len(vocab)


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d, bias=False), nn.GELU(), nn.Linear(4 * d, d, bias=False))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab, d=512, layers=6, heads=8, context=256):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(context, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)  # untied
        nn.init.zeros_(self.head.weight)

    def hidden(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        return self.ln(x)


SOFTCAP = 30.0


def loss_materialised(h, w, y):
    z = h.float() @ w.float().T  # fp32 logits, as cce keeps them on chip (bf16 logits would add their rounding)
    z = SOFTCAP * torch.tanh(z / SOFTCAP)
    return F.cross_entropy(z.view(-1, z.shape[-1]), y.reshape(-1))


def loss_cce(h, w, y):
    import cce_torch

    return cce_torch.linear_cross_entropy(h, w, y, softcap=SOFTCAP)


def train(method, tokens, vocab, args):
    torch.manual_seed(args.seed)
    model = GPT(vocab, context=args.context).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 30) * 0.5 *
                                              (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    gen = torch.Generator().manual_seed(args.seed)
    loss_fn = loss_cce if method == "cce" else loss_materialised
    losses, times = [], []
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for step in range(args.steps):
        starts = torch.randint(0, tokens.numel() - args.context - 1, (args.batch,), generator=gen)
        chunk = torch.stack([tokens[s:s + args.context + 1] for s in starts.tolist()]).cuda(non_blocking=True)
        x, y = chunk[:, :-1], chunk[:, 1:]
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            h = model.hidden(x)
        loss = loss_fn(h.to(torch.bfloat16), model.head.weight.to(torch.bfloat16), y)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())  # synchronises: the step is complete
        times.append(time.perf_counter() - t0)
        if step % 50 == 0 or step == args.steps - 1:
            print(f"  {method:13s} step {step:4d} loss {losses[-1]:.4f}", flush=True)
    return dict(losses=losses, step_ms=1e3 * statistics.median(times[10:] or times),
                peak_bytes=torch.cuda.max_memory_allocated())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=str(pathlib.Path(__file__).resolve().parents[1] / "data" / "corpus.txt"))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seeds", default="0,1,2", help="comma list; the first one is plotted")
    ap.add_argument("--out", default="parity-out")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("train_parity.py needs a CUDA GPU")
        return 1
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    tokens, vocab = build_tokens(pathlib.Path(args.corpus).read_text(encoding="utf-8", errors="replace"), args.vocab)
    print(f"corpus: {tokens.numel()} tokens, vocabulary {vocab} ({time.time() - t0:.0f} s)", flush=True)
    methods = ("cce", "materialised")
    seeds = [int(x) for x in args.seeds.split(",")]
    all_runs = {}
    for seed in seeds:
        args.seed = seed
        all_runs[seed] = {m: train(m, tokens, vocab, args) for m in methods}
    runs = all_runs[seeds[0]]
    a, b = runs["cce"]["losses"], runs["materialised"]["losses"]
    diff = [abs(x - y) for x, y in zip(a, b)]
    tail = max(1, args.steps // 6)  # the loss level at the end: mean of the last sixth of the steps

    def level(r):
        return statistics.fmean(r["losses"][-tail:])

    per_seed = {s: dict(max_abs_loss_difference=max(abs(x - y) for x, y in zip(r["cce"]["losses"],
                                                                               r["materialised"]["losses"])),
                        first_divergence_step=next((i for i, (x, y) in enumerate(
                            zip(r["cce"]["losses"], r["materialised"]["losses"])) if abs(x - y) > 0.01), None),
                        final_level={m: level(r[m]) for m in methods}) for s, r in all_runs.items()}
    summary = dict(tokens_per_step=args.batch * args.context, vocab=vocab, steps=args.steps, seeds=seeds,
                   per_seed=per_seed,
                   final_level_mean={m: statistics.fmean(level(r[m]) for r in all_runs.values()) for m in methods},
                   final_level_spread_over_seeds={
                       m: max(level(r[m]) for r in all_runs.values()) - min(level(r[m]) for r in all_runs.values())
                       for m in methods},
                   peak_memory_gib={m: r["peak_bytes"] / 2**30 for m, r in runs.items()},
                   step_ms={m: statistics.median(r[m]["step_ms"] for r in all_runs.values()) for m in methods})
    (out / "parity.json").write_text(json.dumps(dict(
        summary=summary, losses={s: {m: r["losses"] for m, r in rs.items()} for s, rs in all_runs.items()})))
    for key, val in summary.items():
        print(f"{key}: {val}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_d) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, gridspec_kw=dict(height_ratios=[3, 1]))
    for m, r in runs.items():
        ax.plot(r["losses"], label=f"{m} (step {r['step_ms']:.1f} ms, peak {r['peak_bytes'] / 2**30:.2f} GiB)", lw=1)
    ax.set_ylabel("training loss")
    ax.set_title(f"6-layer GPT, V={vocab}, softcap {SOFTCAP:g}, bf16, {args.batch}x{args.context} tokens per step, "
                 f"seed {seeds[0]}")
    ax.legend()
    ax_d.plot(diff, color="black", lw=0.8)
    ax_d.set_ylabel("|difference|")
    ax_d.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out / "parity.png", dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A float64 materialised implementation of the cce loss: logits formed in full, F.cross_entropy where it has the
option (ignore_index, class weights, label smoothing), the rest (softcap, temperature, bias, low-rank head, z-loss,
shift) written out. Inputs are the same rounded tensors the library gets, converted to float64."""

import torch
import torch.nn.functional as F


def shifted_targets(targets, k, ignore_index):
    """Target of position t is targets[..., t + k]; the last k positions of each sequence have none."""
    if not k:
        return targets
    out = torch.full_like(targets, ignore_index)
    out[..., :-k] = targets[..., k:]
    return out


def logits64(e, c, bias=None, softcap=None, temperature=1.0, lora=None):
    e, c = e.reshape(-1, e.shape[-1]), c
    z = e @ c.T
    if bias is not None:
        z = z + bias
    if lora is not None:
        a, b, s = lora
        z = z + s * (e @ a.T) @ b.T
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def loss64(e, c, targets, bias=None, ignore_index=-100, softcap=None, reduction="mean", shift=False,
           label_smoothing=0.0, z_loss=0.0, weight=None, temperature=1.0, lora=None):
    """Loss and per-row (lse, entropy, logprob, correct, kept) of float64 tensors; differentiable."""
    k = int(shift)
    y = shifted_targets(targets, k, ignore_index).reshape(-1).long()
    z = logits64(e, c, bias, softcap, temperature, lora)
    per_row = F.cross_entropy(z, y, weight=weight, ignore_index=ignore_index, reduction="none",
                              label_smoothing=label_smoothing)
    kept = y != ignore_index
    lse = torch.logsumexp(z, dim=-1)
    per_row = per_row + z_loss * torch.where(kept, lse**2, torch.zeros_like(lse))
    w_y = (weight[y.clamp(min=0)] if weight is not None else torch.ones_like(lse)) * kept
    if reduction == "mean":
        loss = per_row.sum() / w_y.sum()
    elif reduction == "sum":
        loss = per_row.sum()
    else:
        loss = per_row
    p = torch.softmax(z, dim=-1)
    entropy = torch.where(kept, lse - (p * z).sum(-1), torch.zeros_like(lse))
    z_y = z.gather(1, y.clamp(min=0)[:, None])[:, 0]
    logprob = torch.where(kept, z_y - lse, torch.zeros_like(lse))
    top2 = z.topk(min(2, z.shape[1]), dim=-1).values
    gap = top2[:, 0] - top2[:, -1] if z.shape[1] > 1 else torch.full_like(lse, float("inf"))
    correct = kept & (z.argmax(-1) == y)
    return loss, dict(lse=lse, entropy=entropy, logprob=logprob, correct=correct, kept=kept, gap=gap)

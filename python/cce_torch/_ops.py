"""torch.library registration of the compiled operators: shapes for tracing (register_fake) and the gradient
(register_autograd), so that torch.compile sees cce::forward, cce::backward and cce::loss_and_grad as opaque
operators."""

from typing import NamedTuple, Optional

import torch

from . import _ext

_ext.load()

# Positions of the option lists (python/cce_torch/csrc/binding.hpp).
IOPT = ("ignore_index", "reduction", "shift", "seq_len", "filter", "kahan", "deterministic", "mode", "budget",
        "filter_de", "filter_dc")
FOPT = ("softcap", "temperature", "label_smoothing", "z_loss", "filter_eps", "uniform_tolerance", "lora_scale")
# Values of the enumerations in include/cce/options.hpp.
REDUCTION = {"none": 0, "sum": 1, "mean": 2}
FILTER_NONE, FILTER_AUTO, FILTER_THRESHOLD = 0, 1, 2
MODE = {"auto": 0, "minimal": 1, "chunked": 2, "loss_and_grad": 3}
# Bits of the forward's `outputs` argument.
WANT_LSE, WANT_ENTROPY, WANT_LOGPROB, WANT_CORRECT = 1, 2, 4, 8

_TILE = {dt: tuple(torch.ops.cce.tile_shape(dt)) for dt in (torch.bfloat16, torch.float16, torch.float32)}
_ALIGN = 256  # every sub-buffer the library carves starts on a 256-byte boundary


def _aligned(nbytes):
    return (nbytes + _ALIGN - 1) // _ALIGN * _ALIGN


def saved_nbytes(n, v, dtype, filtered):
    """Bytes of the state the forward saves for the backward: lse and the non-target lse per row, two scalars and,
    with the gradient filter, per (row tile x class tile) a float, its max logit, and a byte, whether the filter's
    budget skips its vocab split whole. The operator checks the size against the library's own query."""
    bm, bn = _TILE[dtype]
    tiles = ((n + bm - 1) // bm) * ((v + bn - 1) // bn)
    return 2 * _aligned(4 * n) + 2 * _ALIGN + (_aligned(4 * tiles) + _aligned(tiles) if filtered else 0)


class OpArgs(NamedTuple):
    """The operands of one call, flattened to the operators' N x D form."""

    e: torch.Tensor
    c: torch.Tensor
    targets: torch.Tensor
    bias: Optional[torch.Tensor]
    weight: Optional[torch.Tensor]
    lora_a: Optional[torch.Tensor]
    lora_b: Optional[torch.Tensor]
    iopt: list
    fopt: list


@torch.library.register_fake("cce::forward")
def _forward_fake(e, c, targets, bias, weight, lora_a, lora_b, iopt, fopt, outputs, saved_bytes):
    n = e.shape[0]
    f32 = dict(dtype=torch.float32, device=e.device)
    loss = e.new_empty((n,) if iopt[IOPT.index("reduction")] == REDUCTION["none"] else (), **f32)

    def per_row(bit, dtype=torch.float32):
        return e.new_empty((n if outputs & bit else 0,), dtype=dtype)

    return (loss, per_row(WANT_LSE), per_row(WANT_ENTROPY), per_row(WANT_LOGPROB), per_row(WANT_CORRECT, torch.bool),
            e.new_empty((saved_bytes,), dtype=torch.uint8))


@torch.library.register_fake("cce::backward")
def _backward_fake(grad_loss, e, c, targets, bias, weight, lora_a, lora_b, saved, iopt, fopt, needs):
    n, d, v = e.shape[0], e.shape[1], c.shape[0]
    r = lora_a.shape[0] if lora_a is not None else 0
    shapes = [(n, d), (v, d), (v if bias is not None else 0,), (r, d), (v, r)]
    return tuple(c.new_empty(s if need else (0,)) for s, need in zip(shapes, needs))


@torch.library.register_fake("cce::loss_and_grad")
def _loss_and_grad_fake(e, c, targets, bias, weight, lora_a, lora_b, iopt, fopt, needs):
    n = e.shape[0]
    loss = e.new_empty((n,) if iopt[IOPT.index("reduction")] == REDUCTION["none"] else (), dtype=torch.float32)
    return (loss, *_backward_fake(None, e, c, targets, bias, weight, lora_a, lora_b, None, iopt, fopt, needs))


def _setup_context(ctx, inputs, output):
    e, c, targets, bias, weight, lora_a, lora_b, iopt, fopt, _, _ = inputs
    _, lse, entropy, logprob, correct, saved = output
    ctx.mark_non_differentiable(lse, entropy, logprob, correct, saved)
    ctx.save_for_backward(e, c, targets, bias, weight, lora_a, lora_b, saved)
    ctx.iopt, ctx.fopt = iopt, fopt


_GRAD_INPUTS = (0, 1, 3, 5, 6)  # e, c, bias, lora_a, lora_b: the differentiable inputs, in the backward's order


def _backward(ctx, grad_loss, *unused):
    e, c, targets, bias, weight, lora_a, lora_b, saved = ctx.saved_tensors
    needs = [ctx.needs_input_grad[i] for i in _GRAD_INPUTS]
    grads = [None] * 11
    if grad_loss is None or not any(needs):
        return tuple(grads)
    outs = torch.ops.cce.backward(grad_loss.float().contiguous(), e, c, targets, bias, weight, lora_a, lora_b, saved,
                                  ctx.iopt, ctx.fopt, needs)
    for i, need, g in zip(_GRAD_INPUTS, needs, outs):
        grads[i] = g if need else None
    return tuple(grads)


torch.library.register_autograd("cce::forward", _backward, setup_context=_setup_context)


def forward(args: OpArgs, outputs: int):
    n, v = args.e.shape[0], args.c.shape[0]
    filtered = args.iopt[IOPT.index("filter")] != FILTER_NONE
    return torch.ops.cce.forward(*args, outputs, saved_nbytes(n, v, args.e.dtype, filtered))


def backward(args: OpArgs, grad_loss, saved, needs):
    return torch.ops.cce.backward(grad_loss, args.e, args.c, args.targets, args.bias, args.weight, args.lora_a,
                                  args.lora_b, saved, args.iopt, args.fopt, needs)


def loss_and_grad(args: OpArgs, needs):
    return torch.ops.cce.loss_and_grad(*args, needs)

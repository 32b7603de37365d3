"""The cce loss as PyTorch functions: autograd-aware (linear_cross_entropy) and one-shot (loss_and_grad)."""

from typing import NamedTuple, Optional, Tuple, Union

import torch

from . import _ops


class LinearCrossEntropyOutput(NamedTuple):
    """The loss and the per-row outputs that were asked for (None otherwise), shaped like the targets."""

    loss: torch.Tensor
    lse: Optional[torch.Tensor] = None
    entropy: Optional[torch.Tensor] = None
    logprob: Optional[torch.Tensor] = None
    correct: Optional[torch.Tensor] = None


def _filter(filter_eps):
    if filter_eps is None:
        return _ops.FILTER_NONE, 0.0
    if isinstance(filter_eps, str):
        if filter_eps not in ("auto", "high"):
            raise ValueError(f"filter_eps is 'auto', None or a float, not {filter_eps!r}")
        return _ops.FILTER_AUTO, 0.0
    return _ops.FILTER_THRESHOLD, float(filter_eps)


# apple's cut_cross_entropy implementations by name: what each sets of the filter (filter_eps, filter_e_grad,
# filter_c_grad). Their "kahan" asks for fp32 accumulation, which cce always does; "torch_compile" is not cce.
_IMPL = {
    "cce": None,
    "cce_kahan": None,
    "cce_kahan_full_c": ("auto", True, False),
    "cce_kahan_full_e": ("auto", False, True),
    "cce_kahan_full_c_full_e": (None, True, True),
    "cce_kahan_full": (None, True, True),
    "cce_exact": (None, True, True),
}


def _impl_filter(impl, filter_eps, filter_e_grad, filter_c_grad):
    """The filter arguments after `impl`, which overrides them as apple's presets do."""
    name = getattr(impl, "name", impl)  # an enum member (apple's LinearCrossEntropyImpl) or its lower-case name
    name = str(name).lower()
    if name not in _IMPL:
        raise ValueError(f"impl is one of {sorted(_IMPL)}, not {impl!r}")
    return _IMPL[name] or (filter_eps, filter_e_grad, filter_c_grad)


def _workspace(workspace, one_call=False):
    """'chunked' (the default 256 MiB plan), 'minimal' (64 MiB), or a budget in bytes that picks the widest plan.
    For one call of loss_and_grad also 'loss_and_grad' (1 GiB), and a byte count is that mode's budget."""
    names = ("chunked", "minimal", "loss_and_grad") if one_call else ("chunked", "minimal")
    if isinstance(workspace, str):
        if workspace not in names:
            raise ValueError(f"workspace is one of {names} or a byte count, not {workspace!r}")
        return _ops.MODE[workspace], 0
    if int(workspace) <= 0:
        raise ValueError("a workspace budget is a positive byte count")
    return _ops.MODE["loss_and_grad" if one_call else "auto"], int(workspace)


def _autocast(*tensors):
    """Under torch.autocast the floating inputs go to its dtype, as nn.Linear's would; the casts carry gradients back
    to the original dtypes."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(None if t is None else t.to(dtype) for t in tensors)


def _prepare(e, c, targets, bias, ignore_index, softcap, reduction, shift, filter_eps, accum, label_smoothing, z_loss,
             weight, temperature, lora, deterministic, workspace, uniform_tolerance, filter_e_grad=True,
             filter_c_grad=True, impl="cce", one_call=False):
    if e.dim() < 1 or c.dim() != 2 or e.shape[-1] != c.shape[1]:
        raise ValueError(f"e is (..., D) and c is (V, D): got {tuple(e.shape)} and {tuple(c.shape)}")
    if e.shape[:-1] != targets.shape:
        raise ValueError(f"targets {tuple(targets.shape)} do not match e {tuple(e.shape)}")
    if reduction not in _ops.REDUCTION:
        raise ValueError(f"reduction is 'mean', 'sum' or 'none', not {reduction!r}")
    if accum not in ("fp32", "kahan"):
        raise ValueError(f"accum is 'fp32' or 'kahan', not {accum!r}")
    k = int(shift)
    if k and targets.dim() == 0:
        raise ValueError("shift needs targets with a sequence dimension")
    seq_len = targets.shape[-1] if k else 0
    filter_eps, filter_e_grad, filter_c_grad = _impl_filter(impl, filter_eps, filter_e_grad, filter_c_grad)
    filter_mode, eps = _filter(filter_eps)
    if not (filter_e_grad or filter_c_grad):
        filter_mode = _ops.FILTER_NONE  # the filter applies to neither gradient: off
    mode, budget = _workspace(workspace, one_call)
    lora_a = lora_b = None
    lora_scale = 1.0
    if lora is not None:
        lora_a, lora_b, lora_scale = lora
    e, c, bias, lora_a, lora_b = _autocast(e, c, bias, lora_a, lora_b)
    iopt = dict(ignore_index=int(ignore_index), reduction=_ops.REDUCTION[reduction], shift=k, seq_len=seq_len,
                filter=filter_mode, kahan=int(accum == "kahan"), deterministic=int(bool(deterministic)), mode=mode,
                budget=budget, filter_de=int(bool(filter_e_grad)), filter_dc=int(bool(filter_c_grad)))
    fopt = dict(softcap=float(softcap or 0.0), temperature=float(temperature), label_smoothing=float(label_smoothing),
                z_loss=float(z_loss), filter_eps=eps, uniform_tolerance=float(uniform_tolerance),
                lora_scale=float(lora_scale))
    return _ops.OpArgs(e.reshape(-1, e.shape[-1]), c, targets.reshape(-1), bias,
                       None if weight is None else weight.float(), lora_a, lora_b,
                       [iopt[k_] for k_ in _ops.IOPT], [fopt[k_] for k_ in _ops.FOPT])


def _per_row(x, shape, k):
    """A per-row result in the targets' shape; with shift k the last k positions (no target) are dropped."""
    x = x.view(shape)
    return x[..., : shape[-1] - k] if k else x


def linear_cross_entropy(
    e: torch.Tensor,
    c: torch.Tensor,
    targets: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    softcap: Optional[float] = None,
    reduction: str = "mean",
    shift: Union[bool, int] = False,
    filter_eps: Union[str, float, None] = "auto",
    accum: str = "fp32",
    *,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    weight: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    lora: Optional[Tuple[torch.Tensor, torch.Tensor, float]] = None,
    return_lse: bool = False,
    return_entropy: bool = False,
    return_logprob: bool = False,
    return_correct: bool = False,
    deterministic: bool = False,
    workspace: Union[str, int] = "chunked",
    uniform_tolerance: float = 0.0,
    filter_e_grad: bool = True,
    filter_c_grad: bool = True,
    impl: str = "cce",
):
    """Softmax cross-entropy of the logits softcap(e @ c.T + bias) / temperature against `targets`, without
    forming the logits. e is (..., D), c is (V, D), targets (...) int64 or int32 with `ignore_index` for positions
    that do not count. The loss is float32; gradients reach e, c, bias and the low-rank head lora = (A, B, scale)
    (effective classifier c + scale * B @ A, A is (r, D), B is (V, r)).

    shift=True (or k) pairs position t with target t + k along the last dimension; with reduction 'none' the
    result then has k fewer positions per sequence. label_smoothing, weight (V class weights) and the mean follow
    F.cross_entropy; z_loss adds z_loss * lse**2 per row. filter_eps: 'auto' skips backward tiles whose softmax
    mass is below eps(dtype)/32, None computes every tile, a float sets the threshold. uniform_tolerance: with the
    filter on, rows whose every probability is at most (1 + uniform_tolerance) / V draw their gradient relative to
    1/V and skip the tiles without their target; 0 means eps/2 (exactly flat rows), 1/16 also takes nearly flat
    softmaxes such as a small random head at initialisation, dropping their deviation from flat. Without a bias a
    row may also take the baseline to first order, dropping at most 2 * uniform_tolerance of its mass: by default
    rows within a few per cent of flat (with a softcap, whose curvature counts against the tolerance, too; see
    docs/api.md). filter_e_grad, filter_c_grad (as apple's cut_cross_entropy): the gradients the filter applies to;
    with one of them, every tile's dZ is computed and only that gradient's product skips the negligible ones. impl:
    apple's implementation names, which set those three as apple's presets do ('cce_kahan_full_c': no filter on the
    classifier's gradient; 'cce_exact': none at all; cce always accumulates in fp32).
    Under torch.autocast, e, c, bias and the low-rank factors are cast to its dtype (gradients reach the originals in
    theirs). accum 'kahan' compensates the sums across tiles. workspace: 'chunked', 'minimal' or a budget in bytes
    (docs/api.md). With any return_* the result is a LinearCrossEntropyOutput; otherwise the loss tensor.
    """
    args = _prepare(e, c, targets, bias, ignore_index, softcap, reduction, shift, filter_eps, accum, label_smoothing,
                    z_loss, weight, temperature, lora, deterministic, workspace, uniform_tolerance, filter_e_grad,
                    filter_c_grad, impl)
    wanted = (return_lse, return_entropy, return_logprob, return_correct)
    bits = (_ops.WANT_LSE, _ops.WANT_ENTROPY, _ops.WANT_LOGPROB, _ops.WANT_CORRECT)
    outputs = sum(bit for bit, want in zip(bits, wanted) if want)
    loss, *rows, _ = _ops.forward(args, outputs)
    k = int(shift)
    if reduction == "none":
        loss = _per_row(loss, targets.shape, k)
    if not outputs:
        return loss
    rows = [_per_row(r, targets.shape, k) if want else None for r, want in zip(rows, wanted)]
    return LinearCrossEntropyOutput(loss, *rows)


def loss_and_grad(e, c, targets, bias=None, ignore_index=-100, softcap=None, reduction="mean", shift=False,
                  filter_eps="auto", accum="fp32", *, label_smoothing=0.0, z_loss=0.0, weight=None, temperature=1.0,
                  lora=None, deterministic=False, workspace="loss_and_grad", uniform_tolerance=0.0,
                  filter_e_grad=True, filter_c_grad=True, impl="cce"):
    """The loss and its gradients (upstream gradient 1) in one call, outside autograd: returns (loss, de, dc,
    dbias, da, db) with None for what the call has no input for. Arguments as linear_cross_entropy, but the
    workspace defaults to 'loss_and_grad': up to 1 GiB (a byte count sets another budget), in which the Hopper
    kernels keep the logits of row blocks instead of computing them twice (docs/api.md); 'chunked' and 'minimal'
    run the forward and backward of those modes."""
    args = _prepare(e, c, targets, bias, ignore_index, softcap, reduction, shift, filter_eps, accum, label_smoothing,
                    z_loss, weight, temperature, lora, deterministic, workspace, uniform_tolerance, filter_e_grad,
                    filter_c_grad, impl, one_call=True)
    needs = [True, True, bias is not None, lora is not None, lora is not None]
    with torch.no_grad():
        loss, *grads = _ops.loss_and_grad(args, needs)
    if reduction == "none":
        loss = _per_row(loss, targets.shape, int(shift))
    # each gradient in its input's dtype (under autocast the call ran in autocast's)
    inputs = (e, c, bias) + (tuple(lora[:2]) if lora is not None else (None, None))
    de, dc, dbias, da, db = (g.to(x.dtype) if need else None for g, need, x in zip(grads, needs, inputs))
    return loss, de.view(e.shape), dc, dbias, da, db


class LinearCrossEntropy(torch.nn.Module):
    """linear_cross_entropy with its options fixed at construction: module(e, c, targets[, bias])."""

    def __init__(self, **options):
        super().__init__()
        self.options = options

    def forward(self, e, c, targets, bias=None):
        return linear_cross_entropy(e, c, targets, bias, **self.options)

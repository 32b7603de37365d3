"""cce_torch against the float64 materialised reference (reference.py): loss, per-row outputs and every gradient,
for every option, in bf16, fp16 and fp32, on the CPU executor and the GPU.

Tolerances (the library's contract, docs/testing.md): with u the unit roundoff of the input type (bf16 2^-8,
fp16 2^-11, fp32 2^-24 floored at 1e-6), loss and lse relative error <= 1e-5, entropy and log-prob <= 1e-5 on the
scale of lse, each gradient's relative L2 error <= u with the filter off and <= 2u with it on."""

import math

import pytest
import torch

from reference import loss64

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
LOSS_TOL = 1e-5


def unit_roundoff(dtype):
    return {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 1e-6}[dtype]


def rel_l2(x, ref):
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def make_inputs(n, d, v, dtype, device, regime="lm-like", seed=0, ignore_every=0, batch=None):
    """Embeddings and classifier of shared/bench-spec.md's regimes; targets uniform, every `ignore_every`-th
    position ignored (-100); with `batch`, shaped (batch, sequence)."""
    if batch:  # whole sequences of at least 3 positions
        n = batch * max(3, -(-n // batch))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, v, (n,), generator=g)
    if regime == "lm-like":
        c = torch.randn(v, d, generator=g) * 2 / math.sqrt(d)
        e = torch.randn(n, d, generator=g) + 1.5 * c[y]
    else:
        c = 0.01 * torch.randn(v, d, generator=g)
        e = 0.01 * torch.randn(n, d, generator=g)
    if ignore_every:
        y[::ignore_every] = -100
    shape = (batch, n // batch) if batch else (n,)
    return (e.to(dtype).reshape(*shape, d).to(device), c.to(dtype).to(device), y.reshape(shape).to(device))


def extra_inputs(v, d, dtype, device, bias=False, weight=False, lora_rank=0, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = {}
    if bias:
        out["bias"] = (0.5 * torch.randn(v, generator=g)).to(dtype).to(device)
    if weight:
        out["weight"] = (0.5 + torch.rand(v, generator=g)).to(device)
    if lora_rank:
        a = (torch.randn(lora_rank, d, generator=g) / math.sqrt(d)).to(dtype).to(device)
        b = (0.3 * torch.randn(v, lora_rank, generator=g)).to(dtype).to(device)
        out["lora"] = (a, b, 0.5)
    return out


# Option sets: each is checked on every dtype and device.
CASES = {
    "plain": {},
    "ignore_index": dict(ignore_every=5),
    "ignore_index_custom": dict(ignore_every=4, ignore_index=7),
    "softcap": dict(softcap=3.0),
    "temperature": dict(temperature=0.7),
    "label_smoothing": dict(label_smoothing=0.1, ignore_every=6),
    "z_loss": dict(z_loss=1e-3),
    "weight": dict(weight=True, ignore_every=7),
    "bias": dict(bias=True),
    "lora": dict(lora_rank=4),
    "shift": dict(shift=True, batch=3, ignore_every=5),
    "shift2_none": dict(shift=2, batch=3, reduction="none"),
    "sum": dict(reduction="sum", ignore_every=5),
    "none": dict(reduction="none", ignore_every=5),
    "no_filter": dict(filter_eps=None),
    "filter_e_grad_only": dict(filter_c_grad=False),
    "filter_c_grad_only": dict(filter_e_grad=False),
    "filter_threshold": dict(filter_eps=1e-6),
    "kahan": dict(accum="kahan"),
    "deterministic_exact": dict(deterministic=True, filter_eps=None),
    "minimal": dict(workspace="minimal"),
    "small_budget": dict(workspace=1 << 16, ignore_every=5),
    "int32_targets": dict(int32=True),
    "uniform": dict(regime="uniform"),
    "everything": dict(softcap=3.0, temperature=1.3, label_smoothing=0.05, z_loss=1e-4, weight=True, bias=True,
                       lora_rank=3, shift=True, batch=3, ignore_every=5, accum="kahan", workspace="minimal"),
}
SHAPES = [(78, 40, 1003), (5, 37, 97), (130, 64, 300)]  # odd N, D not a whole vector, V below one tile


def run_case(cce, case, dtype, device, shape, upstream=0.7, one_call=False):
    """The call's results and the float64 reference's. one_call: loss_and_grad (upstream gradient 1), whose result
    has the loss alone; otherwise linear_cross_entropy with every per-row output and autograd."""
    case = dict(case)
    n, d, v = shape
    e, c, y = make_inputs(n, d, v, dtype, device, case.pop("regime", "lm-like"), ignore_every=case.pop("ignore_every", 0),
                          batch=case.pop("batch", None))
    ignore_index = case.get("ignore_index", -100)
    if ignore_index != -100:
        y = torch.where(y == -100, torch.full_like(y, ignore_index), y)
    if case.pop("int32", False):
        y = y.int()
    extras = extra_inputs(v, d, dtype, device, case.pop("bias", False), case.pop("weight", False),
                          case.pop("lora_rank", 0))
    reduction = case.get("reduction", "mean")
    leaves = [e, c] + ([extras["bias"]] if "bias" in extras else []) + (list(extras["lora"][:2]) if "lora" in extras else [])
    for t in leaves:
        t.requires_grad_(True)

    if one_call:
        upstream = 1.0
        out, *grads = cce.loss_and_grad(e, c, y, **extras, **case)
        grads = [g for g in grads if g is not None]  # e, c, bias, A, B: the order of `leaves`
        grad = torch.ones_like(out) if reduction == "none" else torch.tensor(upstream, device=device)
    else:
        out = cce.linear_cross_entropy(e, c, y, return_lse=True, return_entropy=True, return_logprob=True,
                                       return_correct=True, **extras, **case)
        g = torch.Generator().manual_seed(3)
        grad = (torch.rand(out.loss.shape, generator=g) + 0.5).to(device) if reduction == "none" else \
            torch.tensor(upstream, device=device)
        grads = torch.autograd.grad(out.loss, leaves, grad)

    # the reference, on the same rounded values
    leaves64 = [t.detach().double().cpu().requires_grad_(True) for t in leaves]
    e64, c64 = leaves64[:2]
    rest = iter(leaves64[2:])
    ref_kw = {k: v_ for k, v_ in case.items() if k in ("ignore_index", "softcap", "reduction", "shift", "label_smoothing",
                                                     "z_loss", "temperature")}
    bias64 = next(rest) if "bias" in extras else None
    lora64 = (next(rest), next(rest), extras["lora"][2]) if "lora" in extras else None
    weight64 = extras["weight"].double().cpu() if "weight" in extras else None
    loss_ref, rows = loss64(e64, c64, y.cpu(), bias=bias64, weight=weight64, lora=lora64, **ref_kw)
    k = int(case.get("shift", False))

    def per_row(x):  # the reference's N values in the output's shape
        x = x.reshape(y.shape)
        return x[..., : y.shape[-1] - k] if k else x

    if reduction == "none":
        loss_ref = per_row(loss_ref)
        ref_grads = torch.autograd.grad(loss_ref, leaves64, grad.double().cpu())
    else:
        ref_grads = torch.autograd.grad(loss_ref, leaves64, torch.tensor(upstream, dtype=torch.float64))
    return out, grads, loss_ref, ref_grads, {key: per_row(val) for key, val in rows.items()}, case


def check_loss_and_grads(loss, grads, loss_ref, ref_grads, case, dtype):
    loss = loss.double().cpu()
    assert loss.shape == loss_ref.shape
    assert rel_l2(loss, loss_ref.detach()) <= LOSS_TOL
    tol = unit_roundoff(dtype) * (1 if case.get("filter_eps", "auto") is None else 2)
    assert len(grads) == len(ref_grads)
    for i, (got, ref) in enumerate(zip(grads, ref_grads)):
        assert got.dtype == dtype and got.shape == ref.shape
        assert rel_l2(got.cpu(), ref) <= tol, f"gradient {i}: {rel_l2(got.cpu(), ref):.3g} > {tol:.3g}"


def check_case(out, grads, loss_ref, ref_grads, rows, case, dtype):
    check_loss_and_grads(out.loss, grads, loss_ref, ref_grads, case, dtype)
    lse_ref = rows["lse"].detach()
    assert rel_l2(out.lse.cpu(), lse_ref) <= LOSS_TOL
    scale = lse_ref.abs().max().item()
    kept = rows["kept"]
    for name in ("entropy", "logprob"):
        err = (getattr(out, name).double().cpu() - rows[name].detach()).abs().max().item()
        assert err <= LOSS_TOL * scale, name
    # argmax is exact except where the two largest logits agree to within fp32 accumulation error
    clear = kept & (rows["gap"].detach() > 1e-4 * scale)
    assert torch.equal(out.correct.cpu()[clear], rows["correct"][clear])
    assert not out.correct.cpu()[~kept].any()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_float64_reference(cce_torch, device, dtype, name):
    for shape in SHAPES:
        check_case(*run_case(cce_torch, CASES[name], dtype, device, shape), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("name", list(CASES))
def test_loss_and_grad_matches_float64_reference(cce_torch, device, dtype, name):
    """The one call, in its default workspace: on sm_90a with 16-bit inputs it keeps the logits."""
    for shape in SHAPES:
        out, grads, loss_ref, ref_grads, _, case = run_case(cce_torch, CASES[name], dtype, device, shape,
                                                            one_call=True)
        check_loss_and_grads(out, grads, loss_ref, ref_grads, case, dtype)


@pytest.mark.parametrize("regime", ["lm-like", "uniform"])
@pytest.mark.parametrize("workspace", ["loss_and_grad", 16 << 20])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=lambda t: str(t).split(".")[-1])
def test_loss_and_grad_larger_problem(cce_torch, regime, workspace, dtype):
    """N = 1,100, D = 256, V = 12,000 on the GPU: one row block of kept logits, and (16 MiB) three of 512 rows.
    fp16 with the sum: the mean's 1/N puts dZ (p / N, about 8e-8 on uniform data) among fp16's subnormals, whose
    spacing (6e-8) the relative tolerance does not cover (the C++ [kept] bound adds it)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    reduction = "sum" if dtype == torch.float16 else "mean"
    case = dict(regime=regime, workspace=workspace, ignore_every=9, bias=True, reduction=reduction)
    out, grads, loss_ref, ref_grads, _, case = run_case(cce_torch, case, dtype, "cuda", (1100, 256, 12000),
                                                        one_call=True)
    check_loss_and_grads(out, grads, loss_ref, ref_grads, case, dtype)


@pytest.mark.parametrize("regime", ["lm-like", "uniform"])
@pytest.mark.parametrize("workspace", ["chunked", "minimal", 1 << 20])
@pytest.mark.parametrize("filter_eps", ["auto", None])
def test_larger_problem(cce_torch, regime, workspace, filter_eps):
    """Several vocab chunks and row blocks: N = 700, D = 256, V = 12000 in bf16, on the GPU."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    case = dict(regime=regime, workspace=workspace, filter_eps=filter_eps, ignore_every=9)
    check_case(*run_case(cce_torch, case, torch.bfloat16, "cuda", (700, 256, 12000)), torch.bfloat16)


@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("one_call", [False, True], ids=["autograd", "loss_and_grad"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=lambda t: str(t).split(".")[-1])
def test_nearly_flat_rows(cce_torch, device, dtype, one_call, softcap):
    """uniform_tolerance = 1/16 on uniform data, where the rows take the baseline 1/V and may skip their tiles
    without a target (that tiles are skipped, the C++ tests check through the tile counters): the gradients stay
    within the filter's 2u, what the softmax's deviation from flat drops being far below u of 16-bit inputs. fp16 on
    the GPU shape with the sum, as in test_loss_and_grad_larger_problem."""
    shapes = SHAPES + ([(1100, 256, 12000)] if device == "cuda" else [])
    for shape in shapes:
        reduction = "sum" if dtype == torch.float16 and shape[0] > 1000 else "mean"
        case = dict(regime="uniform", uniform_tolerance=1 / 16, ignore_every=9, reduction=reduction)
        if softcap:
            case["softcap"] = softcap
        out, grads, loss_ref, ref_grads, rows, case = run_case(cce_torch, case, dtype, device, shape,
                                                               one_call=one_call)
        if one_call:
            check_loss_and_grads(out, grads, loss_ref, ref_grads, case, dtype)
        else:
            check_case(out, grads, loss_ref, ref_grads, rows, case, dtype)


def test_all_rows_ignored(cce_torch, device):
    e, c, y = make_inputs(9, 16, 50, torch.float32, device)
    y.fill_(-100)
    e.requires_grad_(True)
    c.requires_grad_(True)
    assert torch.isnan(cce_torch.linear_cross_entropy(e, c, y))  # 0 / 0, as F.cross_entropy
    loss = cce_torch.linear_cross_entropy(e, c, y, reduction="sum")
    assert loss.item() == 0.0
    de, dc = torch.autograd.grad(loss, [e, c])
    assert not de.any() and not dc.any()


def test_invalid_target_gives_nan(cce_torch, device):
    e, c, y = make_inputs(9, 16, 50, torch.float32, device)
    y[2] = 50
    assert torch.isnan(cce_torch.linear_cross_entropy(e, c, y))


def test_bad_arguments_raise_with_the_status_text(cce_torch, device):
    e, c, y = make_inputs(9, 16, 50, torch.float32, device)
    with pytest.raises(ValueError, match="an option is outside its domain"):
        cce_torch.linear_cross_entropy(e, c, y, temperature=0.0)
    with pytest.raises(ValueError, match="an option is outside its domain"):
        cce_torch.linear_cross_entropy(e, c, y, label_smoothing=1.5)
    with pytest.raises(ValueError, match="an option is outside its domain"):
        cce_torch.linear_cross_entropy(e, c, y, shift=-1)
    with pytest.raises(ValueError, match="an option is outside its domain"):
        cce_torch.linear_cross_entropy(e, c, y, uniform_tolerance=1.0)
    with pytest.raises(ValueError, match="different dtypes"):
        cce_torch.linear_cross_entropy(e, c.double(), y)
    with pytest.raises(ValueError):
        cce_torch.linear_cross_entropy(e, c, y, reduction="avg")
    with pytest.raises(ValueError):
        cce_torch.linear_cross_entropy(e, c, y, workspace="large")
    with pytest.raises(ValueError):  # the one-call mode, which autograd's backward cannot run
        cce_torch.linear_cross_entropy(e, c, y, workspace="loss_and_grad")


def test_strided_rows_are_read_in_place(cce_torch, device):
    """E with a row stride above D (a slice of a wider tensor) gives the contiguous result bit for bit."""
    e, c, y = make_inputs(33, 24, 200, torch.bfloat16, device)
    wide = torch.zeros(33, 40, dtype=e.dtype, device=device)
    wide[:, :24] = e
    a = cce_torch.linear_cross_entropy(wide[:, :24], c, y)
    b = cce_torch.linear_cross_entropy(e, c, y)
    assert torch.equal(a, b)


def test_deterministic_is_bitwise_repeatable(cce_torch, device):
    e, c, y = make_inputs(300, 64, 2000, torch.bfloat16, device)
    e.requires_grad_(True)
    c.requires_grad_(True)
    runs = []
    for _ in range(3):
        loss = cce_torch.linear_cross_entropy(e, c, y, deterministic=True, filter_eps=None)
        runs.append((loss, *torch.autograd.grad(loss, [e, c])))
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


def test_filter_on_one_gradient(cce_torch, device):
    """filter_e_grad / filter_c_grad: at a threshold that skips tiles holding visible mass, the gradient left out of
    the filter is that of the unfiltered call and the other that of the call filtering both, bit for bit."""
    g = torch.Generator().manual_seed(3)
    n, d, v = 256, 256, 1000
    c = torch.randn(v, d, generator=g) / d**0.25
    e = c[:n].clone()  # each row's own class dominates: tiles far from it are negligible
    y = torch.arange(n) ^ 1  # targets beside the dominant classes, in their tiles (target tiles are always computed)
    e, c, y = e.bfloat16().to(device), c.bfloat16().to(device), y.to(device)

    def grads(**options):
        leaves = [t.clone().requires_grad_(True) for t in (e, c)]
        loss = cce_torch.linear_cross_entropy(*leaves, y, deterministic=True, **options)
        return torch.autograd.grad(loss, leaves)

    none, both = grads(filter_eps=None), grads(filter_eps=0.5)
    assert not torch.equal(both[0], none[0]) and not torch.equal(both[1], none[1])
    de_only = grads(filter_eps=0.5, filter_c_grad=False)
    assert torch.equal(de_only[0], both[0]) and torch.equal(de_only[1], none[1])
    dc_only = grads(filter_eps=0.5, filter_e_grad=False)
    assert torch.equal(dc_only[0], none[0]) and torch.equal(dc_only[1], both[1])
    neither = grads(filter_eps=0.5, filter_e_grad=False, filter_c_grad=False)
    assert torch.equal(neither[0], none[0]) and torch.equal(neither[1], none[1])
    # apple's implementation names set the same arguments (and override them)
    presets = {"cce_kahan_full_c": dict(filter_c_grad=False), "cce_kahan_full_e": dict(filter_e_grad=False),
               "cce_exact": dict(filter_eps=None)}
    for impl, options in presets.items():
        assert all(torch.equal(a, b) for a, b in zip(grads(impl=impl, filter_eps=0.5), grads(**options)))
    with pytest.raises(ValueError, match="impl"):
        cce_torch.linear_cross_entropy(e, c, y, impl="torch_compile")


def test_autocast(cce_torch, device):
    """Under torch.autocast the inputs run in its dtype, as nn.Linear's would, and the gradients reach the fp32
    leaves: the values of a bf16 call, in fp32. loss_and_grad returns its gradients in the inputs' dtype."""
    e, c, y = make_inputs(64, 32, 500, torch.float32, device)
    bias = extra_inputs(500, 32, torch.float32, device, bias=True)["bias"]
    leaves = [t.clone().requires_grad_(True) for t in (e, c, bias)]
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        loss = cce_torch.linear_cross_entropy(leaves[0], leaves[1], y, leaves[2], deterministic=True)
    grads = torch.autograd.grad(loss, leaves)
    low = [t.bfloat16().requires_grad_(True) for t in (e, c, bias)]
    ref = cce_torch.linear_cross_entropy(low[0], low[1], y, low[2], deterministic=True)
    ref_grads = torch.autograd.grad(ref, low)
    assert torch.equal(loss, ref)
    assert all(g.dtype == torch.float32 and torch.equal(g, r.float()) for g, r in zip(grads, ref_grads))
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        one_call = cce_torch.loss_and_grad(e, c, y, bias, deterministic=True, workspace="chunked")
    ref_one_call = cce_torch.loss_and_grad(e.bfloat16(), c.bfloat16(), y, bias.bfloat16(), deterministic=True,
                                           workspace="chunked")
    assert torch.equal(one_call[0], ref_one_call[0])
    for got, want in zip(one_call[1:4], ref_one_call[1:4]):
        assert got.dtype == torch.float32 and torch.equal(got, want.float())


def test_loss_and_grad_matches_autograd(cce_torch, device):
    """In the chunked workspace the one call is the forward and backward of autograd, bit for bit."""
    e, c, y = make_inputs(64, 32, 500, torch.bfloat16, device, ignore_every=5)
    bias = extra_inputs(500, 32, torch.bfloat16, device, bias=True)["bias"]
    loss, de, dc, dbias, da, db = cce_torch.loss_and_grad(e, c, y, bias, softcap=4.0, workspace="chunked")
    leaves = [t.clone().requires_grad_(True) for t in (e, c, bias)]
    ref = cce_torch.linear_cross_entropy(*leaves[:2], y, leaves[2], softcap=4.0)
    assert torch.equal(loss, ref)
    for got, want in zip((de, dc, dbias), torch.autograd.grad(ref, leaves)):
        assert torch.equal(got, want)
    assert da is None and db is None


def test_frozen_classifier_gets_no_gradient(cce_torch, device):
    e, c, y = make_inputs(20, 16, 100, torch.float32, device)
    e.requires_grad_(True)
    loss = cce_torch.linear_cross_entropy(e, c, y)
    loss.backward()
    assert e.grad is not None and c.grad is None


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
def test_torch_compile_fullgraph(cce_torch, device, dtype):
    """A compiled step (a linear layer, then the loss) without graph breaks gives the eager loss and dC bit for bit."""
    e, c, y = make_inputs(48, 32, 300, dtype, device, ignore_every=5)
    w = torch.nn.Parameter(torch.eye(32, dtype=dtype, device=device))

    def step(x, c, y):
        h = x @ w
        return cce_torch.linear_cross_entropy(h, c, y, softcap=4.0, label_smoothing=0.1)

    compiled = torch.compile(step, fullgraph=True)
    results = []
    for fn in (step, compiled):
        ci = c.clone().requires_grad_(True)
        loss = fn(e, ci, y)
        results.append((loss, *torch.autograd.grad(loss, [ci, w])))
    (loss, dc, dw), (loss_c, dc_c, dw_c) = results
    assert torch.equal(loss, loss_c) and torch.equal(dc, dc_c)  # the same operator on the same values
    torch.testing.assert_close(dw, dw_c)  # a GEMM the compiler may schedule differently


def test_torch_compile_dynamic_shapes(cce_torch, device):
    f = torch.compile(lambda e, c, y: cce_torch.linear_cross_entropy(e, c, y, reduction="none"), fullgraph=True,
                      dynamic=True)
    for n in (17, 40):
        e, c, y = make_inputs(n, 16, 90, torch.float32, device)
        assert torch.equal(f(e, c, y), cce_torch.linear_cross_entropy(e, c, y, reduction="none"))


def test_opcheck(cce_torch, device):
    """torch.library's consistency checks of the operators: schema, fake shapes, autograd, AOT dispatch."""
    from cce_torch import _ops
    from cce_torch.functional import _prepare

    e, c, y = make_inputs(20, 16, 100, torch.bfloat16, device)
    e.requires_grad_(True)
    c.requires_grad_(True)
    args = _prepare(e, c, y, None, -100, None, "mean", False, "auto", "fp32", 0.0, 0.0, None, 1.0, None, False,
                    "chunked", 0.0)
    saved_bytes = _ops.saved_nbytes(20, 100, torch.bfloat16, True)
    torch.library.opcheck(torch.ops.cce.forward.default, (*args, _ops.WANT_LSE, saved_bytes))
    plain = args._replace(e=e.detach(), c=c.detach())
    saved = torch.ops.cce.forward(*plain, 0, saved_bytes)[-1]
    grad = torch.tensor(0.5, device=device)
    torch.library.opcheck(torch.ops.cce.backward.default, (grad, *plain[:7], saved, plain.iopt, plain.fopt,
                                                           [True, True, False, False, False]))
    one_call = _prepare(e.detach(), c.detach(), y, None, -100, None, "mean", False, "auto", "fp32", 0.0, 0.0, None,
                        1.0, None, False, "loss_and_grad", 0.0, one_call=True)
    torch.library.opcheck(torch.ops.cce.loss_and_grad.default, (*one_call, [True, True, False, False, False]))

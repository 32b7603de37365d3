#!/usr/bin/env python3
"""Side-by-side comparison of cce with the other ways of computing a language model's output-layer loss, on the
shapes and data regimes of the benchmark specification, in one process on the same inputs.

Methods: cce (forward; forward + backward with the `minimal` and `chunked` workspaces; one-call loss_and_grad;
exact mode; no filter on dC), torch with materialised logits, a torch.compile'd chunked implementation, apple's Cut
Cross-Entropy (`cut_cross_entropy`, default, exact and its `cce_kahan_full_c` preset), Liger's fused linear cross-entropy (`liger_kernel`), and the cuBLAS bf16
GEMM E·Cᵀ that every time is divided by. Each time is the median of --reps CUDA-event timings after warm-up; extra
memory is the peak allocated during one call minus what was allocated before it (the inputs) and the gradient
outputs themselves. A method that fails or runs out of memory is reported as such.

Parts (--parts):
  table     fw and fw-bw ratios and extra memory per shape, regime and method (table.md, table.json, ratios.png)
  accuracy  relative L2 error of loss, dE and dC against float64 at N=2048, D=1024, V=32000 (accuracy.md/.json)
  scaling   time and extra memory against N = 4k..64k tokens for one shape (scaling.png, scaling.json)
  budget    cce fw-bw ratio against the workspace budget, 64 MiB .. 1 GiB (budget.png, budget.json)

  python3 bench/compare.py --parts table --shapes llama3,gpt2 --regimes lm-like --out results/
  python3 bench/compare.py --merge a/table.json,b/table.json --out results/     (one table and plot of several runs)
"""

import argparse
import gc
import json
import math
import pathlib
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "python"))

SHAPES = {  # name: (N, D, V, softcap)
    "gemma2": (8192, 2304, 256000, None),
    "gemma2-softcap": (8192, 2304, 256000, 30.0),
    "llama3": (8192, 4096, 128256, None),
    "mistral-nemo": (8192, 5120, 131072, None),
    "phi3.5": (8192, 3072, 32064, None),
    "qwen2.5": (8192, 3584, 152064, None),
    "gpt2": (8192, 768, 50304, 30.0),
    "gpt2-64k": (65536, 768, 50304, 30.0),
    "gemma2-64k": (65536, 2304, 256000, None),
}
REGIMES = ("peaked", "lm-like", "uniform")


def make_data(n, d, v, regime, seed=0, dtype=torch.bfloat16):
    """The data regimes of the benchmark specification, generated in fp32 on the GPU and rounded to dtype."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    y = torch.randint(0, v, (n,), device="cuda", generator=g)
    if regime == "peaked":
        c = torch.randn(v, d, device="cuda", generator=g) / d**0.25
        e = torch.randn(n, d, device="cuda", generator=g) / d**0.25
        m = min(n, v)
        c[:m] = e[:m]
    elif regime == "lm-like":
        c = torch.randn(v, d, device="cuda", generator=g) * 2 / math.sqrt(d)
        e = torch.randn(n, d, device="cuda", generator=g) + 1.5 * c[y]
    elif regime == "uniform":
        c = 0.01 * torch.randn(v, d, device="cuda", generator=g)
        e = 0.01 * torch.randn(n, d, device="cuda", generator=g)
    else:
        raise ValueError(regime)
    return e.to(dtype), c.to(dtype), y


# ---------------------------------------------------------------------------------------------------- methods
# Each method is loss(e, c, y, softcap) -> scalar tensor, differentiable in e and c, or raises ImportError.


def torch_materialised(e, c, y, softcap):
    z = e @ c.T
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    return F.cross_entropy(z.float(), y)


_compiled = {}


def _chunk_loss(e, c, y, softcap):
    z = (e @ c.T).float()
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    return (torch.logsumexp(z, -1) - z.gather(1, y[:, None])[:, 0]).sum()


def _chunk_loss_and_grad(e, c, y, softcap, scale):
    """Loss sum of one chunk and its gradients (scaled by `scale`), written out so that the compiler fuses them."""
    z = (e @ c.T).float()
    if softcap:
        t = torch.tanh(z / softcap)
        z = softcap * t
    lse = torch.logsumexp(z, -1)
    loss = (lse - z.gather(1, y[:, None])[:, 0]).sum()
    dz = torch.exp(z - lse[:, None])
    dz.scatter_add_(1, y[:, None], torch.full_like(lse[:, None], -1.0))
    if softcap:
        dz = dz * (1 - t * t)
    dz = (dz * scale).to(e.dtype)
    return loss, dz @ c, (dz.T @ e).float()


class _CompiledChunked(torch.autograd.Function):
    """Mean cross-entropy over row chunks, each a torch.compile'd GEMM + softmax; gradients are formed in the
    forward (one chunk of fp32 logits alive at a time) and scaled by the upstream gradient in the backward."""

    chunks = 8

    @staticmethod
    def forward(ctx, e, c, y, softcap):
        if "lg" not in _compiled:
            _compiled["lg"] = torch.compile(_chunk_loss_and_grad, dynamic=False)
            _compiled["l"] = torch.compile(_chunk_loss, dynamic=False)
        n = e.shape[0]
        loss = torch.zeros((), device=e.device)
        if not (e.requires_grad or c.requires_grad):
            for es, ys in zip(e.chunk(_CompiledChunked.chunks), y.chunk(_CompiledChunked.chunks)):
                loss += _compiled["l"](es, c, ys, softcap)
            return loss / n
        de = torch.empty_like(e)
        dc = torch.zeros(c.shape, dtype=torch.float32, device=c.device)
        for i, (es, ys) in enumerate(zip(e.chunk(_CompiledChunked.chunks), y.chunk(_CompiledChunked.chunks))):
            l, de_i, dc_i = _compiled["lg"](es, c, ys, softcap, 1.0 / n)
            loss += l
            de[i * es.shape[0]:(i + 1) * es.shape[0]] = de_i
            dc += dc_i
        ctx.save_for_backward(de, dc.to(c.dtype))
        return loss / n

    @staticmethod
    def backward(ctx, g):
        de, dc = ctx.saved_tensors
        return de * g, dc * g, None, None


def torch_compile_chunked(e, c, y, softcap):
    return _CompiledChunked.apply(e, c, y, softcap)


def apple_cce(**options):
    def run(e, c, y, softcap):
        from cut_cross_entropy import linear_cross_entropy as apple

        return apple(e, c, y, softcap=softcap, **options)

    return run


def liger_flce(e, c, y, softcap):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return liger_fused_linear_cross_entropy(e, c, y, softcap=softcap)


def cce(**options):
    def run(e, c, y, softcap):
        import cce_torch

        return cce_torch.linear_cross_entropy(e, c, y, softcap=softcap, **options)

    return run


def cce_loss_and_grad(**options):
    """One call for the loss and both gradients: timed as fw-bw only."""

    def run(e, c, y, softcap):
        import cce_torch

        return cce_torch.loss_and_grad(e, c, y, softcap=softcap, **options)

    run.one_call = True
    return run


METHODS = {
    "cce": cce(),
    "cce minimal": cce(workspace="minimal"),
    "cce chunked": cce(workspace="chunked"),
    "cce loss_and_grad": cce_loss_and_grad(),
    "cce exact minimal": cce(workspace="minimal", filter_eps=None, deterministic=True),
    "cce full-c": cce(workspace="chunked", impl="cce_kahan_full_c"),  # no filter on dC, as apple's preset
    "torch materialised": torch_materialised,
    "torch.compile chunked": torch_compile_chunked,
    "apple cce": apple_cce(filter_eps="auto"),
    "apple cce exact": apple_cce(filter_eps=None),  # its gradient filter off
    "apple cce full-c": apple_cce(impl="cce_kahan_full_c"),  # its pretraining preset: no filter on dC
    "liger flce": liger_flce,
}
# Which parts each method is timed in: cce's own forward does not depend on the workspace, so it is timed once.
FW_ONLY = {"cce"}
FWBW_ONLY = {"cce minimal", "cce chunked", "cce loss_and_grad", "cce exact minimal", "cce full-c"}


# ---------------------------------------------------------------------------------------------------- measuring


def _free():
    gc.collect()
    torch.cuda.empty_cache()


def _call(method, e, c, y, softcap, backward):
    """One call: the loss, and with `backward` the gradients; returns the gradient tensors (or ())."""
    if getattr(method, "one_call", False):
        loss, de, dc, *_ = method(e, c, y, softcap)
        return (de, dc) if backward else ()
    if not backward:
        with torch.no_grad():
            method(e, c, y, softcap)
        return ()
    loss = method(e.requires_grad_(True), c.requires_grad_(True), y, softcap)
    grads = torch.autograd.grad(loss, [e, c])
    e.requires_grad_(False)
    c.requires_grad_(False)
    return grads


def measure(method, e, c, y, softcap, backward, reps, warmup=3):
    """(median ms, extra bytes) or a string saying why the method did not run."""
    try:
        for _ in range(warmup):
            _call(method, e, c, y, softcap, backward)
        torch.cuda.synchronize()
        _free()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        grads = _call(method, e, c, y, softcap, backward)
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base - sum(g.numel() * g.element_size() for g in grads)
        del grads
        times = []
        for _ in range(reps):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            _call(method, e, c, y, softcap, backward)
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop))
        return statistics.median(times), extra
    except ImportError as err:
        return f"not installed ({err.name})"
    except torch.cuda.OutOfMemoryError:
        return "out of memory"
    except Exception as err:  # a peer's failure is a result, not a crash of the comparison
        return f"failed: {type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"
    finally:
        e.requires_grad_(False)
        c.requires_grad_(False)
        _free()


def gemm_ms(e, c, reps):
    ct = c.T
    for _ in range(3):
        torch.matmul(e, ct)
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.matmul(e, ct)
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    _free()
    return statistics.median(times)


def fmt_ratio(r):
    return f"{r['ms'] / r['gemm_ms']:.2f}" if isinstance(r.get("ms"), float) else r.get("error", "")


def fmt_mem(r):
    if not isinstance(r.get("extra_bytes"), int):
        return ""
    b = r["extra_bytes"]
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"


# ---------------------------------------------------------------------------------------------------- parts


def part_table(args, methods, out):
    rows = []
    for shape in args.shapes:
        n, d, v, softcap = SHAPES[shape]
        for regime in args.regimes:
            e, c, y = make_data(n, d, v, regime)
            g = gemm_ms(e, c, args.reps)
            print(f"\n{shape} ({n} x {d} x {v}, softcap {softcap}) / {regime}: cuBLAS GEMM {g:.3f} ms", flush=True)
            for name in methods:
                for part in ("fw", "fw-bw"):
                    if (part == "fw" and name in FWBW_ONLY) or (part == "fw-bw" and name in FW_ONLY):
                        continue
                    t0 = time.time()
                    res = measure(METHODS[name], e, c, y, softcap, part == "fw-bw", args.reps)
                    row = dict(shape=shape, regime=regime, method=name, part=part, gemm_ms=g)
                    if isinstance(res, str):
                        row["error"] = res
                    else:
                        row["ms"], row["extra_bytes"] = res
                    rows.append(row)
                    print(f"  {name:22s} {part:6s} ratio {fmt_ratio(row):>8s}  extra {fmt_mem(row):>10s}"
                          f"  ({time.time() - t0:.0f} s)", flush=True)
            del e, c, y
            _free()
    (out / "table.json").write_text(json.dumps(rows, indent=1))
    write_table(rows, args.shapes, args.regimes, methods, out)


def write_table(rows, shapes, regimes, methods, out):
    """table.md and ratios.png from measured rows (also for rows merged from several runs, --merge)."""
    lines = ["| shape / data | method | fw ratio | fw-bw ratio | extra memory fw / fw-bw |", "|---|---|---|---|---|"]
    for shape in shapes:
        for regime in regimes:
            for name in methods:
                sel = {r["part"]: r for r in rows if (r["shape"], r["regime"], r["method"]) == (shape, regime, name)}
                fw, fb = sel.get("fw", {}), sel.get("fw-bw", {})
                if fw or fb:
                    lines.append(f"| {shape} / {regime} | {name} | {fmt_ratio(fw) if fw else ''} | "
                                 f"{fmt_ratio(fb) if fb else ''} | {fmt_mem(fw)} / {fmt_mem(fb)} |")
    gemms = sorted({(r["shape"], r["regime"], r["gemm_ms"]) for r in rows})
    lines += ["", "cuBLAS bf16 GEMM (the ratios' denominator): " +
              ", ".join(f"{s} / {rg} {ms:.3f} ms" for s, rg, ms in gemms)]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))
    plot_ratios(rows, methods, out / "ratios.png")


def plot_ratios(rows, methods, path):
    """One panel per (part, data regime): bars per method, grouped by shape, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    shapes = [s for s in SHAPES if any(r["shape"] == s for r in rows)]
    regimes = [g for g in REGIMES if any(r["regime"] == g for r in rows)]
    panels = [(part, regime) for part in ("fw", "fw-bw") for regime in regimes]
    colors = {m: plt.get_cmap("tab20")(i % 20) for i, m in enumerate(methods)}
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(9, 1.9 * len(shapes)) + 3, 3.2 * len(panels)),
                             squeeze=False)
    for ax, (part, regime) in zip(axes[:, 0], panels):
        names = [m for m in methods if any(r["method"] == m and r["part"] == part for r in rows)]
        width = 0.8 / max(len(names), 1)
        for i, name in enumerate(names):
            for j, shape in enumerate(shapes):
                hit = [r for r in rows if (r["shape"], r["regime"], r["method"], r["part"]) == (shape, regime, name, part)]
                if hit and "ms" in hit[0]:
                    ax.bar(j + i * width, hit[0]["ms"] / hit[0]["gemm_ms"], width, color=colors[name])
                elif hit:  # failed or out of memory: a cross on the GEMM line
                    ax.plot(j + i * width, 1.0, "x", color=colors[name], markersize=9, mew=2)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))], shapes, fontsize=9)
        ax.set_ylabel(f"{part} / GEMM")
        ax.set_title(f"{part}, {regime} data", fontsize=10)
        ax.set_yscale("log")
        ax.axhline(1.0, color="black", lw=0.8)
        ax.legend(handles=[Patch(color=colors[n], label=n) for n in names], fontsize=8, loc="upper left",
                  bbox_to_anchor=(1.01, 1.0))
    fig.suptitle("time relative to the same-run bf16 GEMM E·Cᵀ (x: failed or out of memory)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def part_accuracy(args, methods, out):
    n, d, v = 2048, 1024, 32000
    rows = []
    for regime in ("lm-like", "uniform"):
        e, c, y = make_data(n, d, v, regime)
        e64, c64 = e.double().requires_grad_(True), c.double().requires_grad_(True)
        ref = F.cross_entropy(e64 @ c64.T, y)
        ref_de, ref_dc = torch.autograd.grad(ref, [e64, c64])
        for name in methods:
            if name in FW_ONLY:
                continue
            row = dict(regime=regime, method=name)
            try:
                method = METHODS[name]
                if getattr(method, "one_call", False):
                    loss, de, dc, *_ = method(e, c, y, None)
                else:
                    ei, ci = e.clone().requires_grad_(True), c.clone().requires_grad_(True)
                    loss = method(ei, ci, y, None)
                    de, dc = torch.autograd.grad(loss, [ei, ci])
                rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()  # noqa: E731
                row.update(loss=rel(loss.detach().reshape(()), ref.detach()), de=rel(de, ref_de), dc=rel(dc, ref_dc))
            except ImportError as err:
                row["error"] = f"not installed ({err.name})"
            except Exception as err:
                row["error"] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"
            rows.append(row)
            print(f"  {regime:8s} {name:22s} " + (row.get("error") or
                  f"loss {row['loss']:.2e}  dE {row['de']:.2e}  dC {row['dc']:.2e}"), flush=True)
        del e, c, y, e64, c64, ref_de, ref_dc
        _free()
    (out / "accuracy.json").write_text(json.dumps(rows, indent=1))
    lines = [f"Relative L2 error against float64, N={n}, D={d}, V={v}, mean reduction", "",
             "| data | method | loss | dE | dC |", "|---|---|---|---|---|"]
    for r in rows:
        cells = [r["error"], "", ""] if "error" in r else [f"{r[k]:.2e}" for k in ("loss", "de", "dc")]
        lines.append(f"| {r['regime']} | {r['method']} | " + " | ".join(cells) + " |")
    (out / "accuracy.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def part_scaling(args, methods, out):
    _, d, v, softcap = SHAPES[args.scaling_shape]
    ns = [4096 * 2**k for k in range(5)]  # 4k .. 64k tokens
    rows = []
    for n in ns:
        e, c, y = make_data(n, d, v, args.scaling_regime)
        g = gemm_ms(e, c, args.reps)
        for name in methods:
            if name in FW_ONLY:
                continue
            res = measure(METHODS[name], e, c, y, softcap, True, args.reps)
            row = dict(n=n, method=name, gemm_ms=g)
            if isinstance(res, str):
                row["error"] = res
            else:
                row["ms"], row["extra_bytes"] = res
            rows.append(row)
            print(f"  N={n:6d} {name:22s} " + (row.get("error") or f"{row['ms']:.2f} ms  {fmt_mem(row)}"), flush=True)
        del e, c, y
        _free()
    (out / "scaling.json").write_text(json.dumps(rows, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(13, 5))
    for name in methods:
        pts = [r for r in rows if r["method"] == name and "ms" in r]
        if pts:
            ax_t.plot([r["n"] for r in pts], [r["ms"] for r in pts], "o-", label=name)
            ax_m.plot([r["n"] for r in pts], [r["extra_bytes"] / 2**30 for r in pts], "o-", label=name)
    gemm = sorted({(r["n"], r["gemm_ms"]) for r in rows})
    ax_t.plot([n for n, _ in gemm], [g for _, g in gemm], "k--", label="cuBLAS GEMM (fw floor)")
    for ax, label in ((ax_t, "fw-bw time (ms)"), (ax_m, "extra memory (GiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens N")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.suptitle(f"{args.scaling_shape} (D={d}, V={v}) / {args.scaling_regime}; missing points: failed or out of memory")
    fig.tight_layout()
    fig.savefig(out / "scaling.png", dpi=120)


def part_budget(args, methods, out):
    n, d, v, softcap = SHAPES[args.budget_shape]
    rows = []
    for regime in args.regimes:
        e, c, y = make_data(n, d, v, regime)
        g = gemm_ms(e, c, args.reps)
        for mib in (64, 128, 256, 512, 1024):
            res = measure(cce(workspace=mib << 20), e, c, y, softcap, True, args.reps)
            row = dict(regime=regime, budget_mib=mib, gemm_ms=g)
            if isinstance(res, str):
                row["error"] = res
            else:
                row["ms"], row["extra_bytes"] = res
            rows.append(row)
            print(f"  {regime:8s} budget {mib:5d} MiB  ratio {fmt_ratio(row)}  extra {fmt_mem(row)}", flush=True)
        del e, c, y
        _free()
    (out / "budget.json").write_text(json.dumps(rows, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for regime in args.regimes:
        pts = [r for r in rows if r["regime"] == regime and "ms" in r]
        ax.plot([r["budget_mib"] for r in pts], [r["ms"] / r["gemm_ms"] for r in pts], "o-", label=regime)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("workspace budget (MiB)")
    ax.set_ylabel("cce fw-bw time / cuBLAS GEMM")
    ax.set_title(f"{args.budget_shape} (N={n}, D={d}, V={v})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "budget.png", dpi=120)


PARTS = {"table": part_table, "accuracy": part_accuracy, "scaling": part_scaling, "budget": part_budget}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="table", help=f"comma list of {','.join(PARTS)}")
    ap.add_argument("--shapes", default="llama3,gpt2", help=f"comma list of {','.join(SHAPES)} or 'all'")
    ap.add_argument("--regimes", default="lm-like", help=f"comma list of {','.join(REGIMES)}")
    ap.add_argument("--methods", default="all", help=f"comma list of {','.join(METHODS)} or 'all'")
    ap.add_argument("--reps", type=int, default=10, help="timed repetitions (median), at least 10")
    ap.add_argument("--scaling-shape", default="gpt2")
    ap.add_argument("--scaling-regime", default="lm-like")
    ap.add_argument("--budget-shape", default="llama3")
    ap.add_argument("--out", default="compare-out")
    ap.add_argument("--merge", help="comma list of table.json files from earlier runs: write their joint table.md "
                                    "and ratios.png to --out (no GPU needed)")
    args = ap.parse_args()
    args.shapes = list(SHAPES) if args.shapes == "all" else args.shapes.split(",")
    args.regimes = args.regimes.split(",")
    methods = list(METHODS) if args.methods == "all" else args.methods.split(",")
    for name, table in (("shape", SHAPES), ("regime", REGIMES), ("method", METHODS)):
        chosen = {"shape": args.shapes, "regime": args.regimes, "method": methods}[name]
        unknown = [x for x in chosen if x not in table]
        if unknown:
            ap.error(f"unknown {name}: {unknown}")
    unknown = [p for p in args.parts.split(",") if p not in PARTS]
    if unknown:
        ap.error(f"unknown part: {unknown}")
    if args.reps < 10:
        ap.error("--reps is at least 10")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        rows = [r for f in args.merge.split(",") for r in json.loads(pathlib.Path(f).read_text())]
        (out / "table.json").write_text(json.dumps(rows, indent=1))
        present = lambda key, order: [x for x in order if any(r[key] == x for r in rows)]
        write_table(rows, present("shape", SHAPES), present("regime", REGIMES), present("method", methods), out)
        return 0
    if not torch.cuda.is_available():
        print("compare.py needs a CUDA GPU")
        return 1
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    for part in args.parts.split(","):
        t0 = time.time()
        print(f"\n=== {part}", flush=True)
        PARTS[part](args, methods, out)
        print(f"=== {part}: {time.time() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

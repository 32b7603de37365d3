#!/usr/bin/env python3
"""Compile-time tuner: picks the tile policy of a model shape by measurement and writes its preset header.

    python3 bench/tune/tune.py --name llama3 --d 4096 --v 128256 [--n 8192] [--dtype bf16] [--arch 90a]
                               [--softcap 0] [--out include/cce/presets] [--build build-tune] [--jobs 16]

Candidates are `cce::tile::policy` types. Each is compiled once (nvcc, bench/tune/candidate.cu; binaries are kept
in --build and shared by every model tuned with the same --dtype and --arch) and run on the GPU of this machine on
the benchmark data of shared/bench-spec.md (lm-like regime). The search has two stages, because on sm_90a the
forward depends only on how finely it splits the vocabulary and the backward's gradient GEMMs only on the tile
shape: stage 1 times every tile shape at the default split and every split with the default tile shape; stage 2
times their combination. Rounds interleave the candidates so that clock drift hits all alike; a candidate's score
is its median forward + `chunked` backward time over the rounds. The default policy is kept unless a candidate
beats it by more than --margin (default 1 %), so a preset is never slower than the default on its own shape as
measured. Prints a table (markdown) and writes <out>/<name>.hpp.
"""

import argparse
import concurrent.futures
import datetime
import json
import os
import pathlib
import statistics
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
TYPES = {"bf16": "__nv_bfloat16", "f16": "__half"}
# (bm, bn, bk, stages, warps_m, warps_n, min_blocks): 128 x 128 tiles keep the sm_90a kernels' filter grid.
DEFAULT_TILE = (128, 128, 64, 3, 4, 2, 2)
TILES = [DEFAULT_TILE, (128, 128, 32, 4, 4, 2, 2), (128, 128, 64, 4, 4, 2, 1), (128, 128, 32, 4, 2, 4, 2),
         (128, 128, 32, 3, 2, 4, 2)]
DEFAULT_SPLIT = 16
SPLITS = [4, 8, DEFAULT_SPLIT, 32]
# Options the model is trained with (final-logit softcapping for Gemma 2 and the GPT-2 speedrun).
RECOMMENDED = {"gemma2": {"softcap": 30.0}, "gpt2": {"softcap": 30.0}}


def policy_type(tile, split):
    return "cce::tile::policy<{}, {}>".format(", ".join(map(str, tile)), split)


def binary_name(tile, split):
    return "cand_" + "_".join(map(str, tile)) + f"_{split}"


def compile_candidate(args, tile, split):
    out = pathlib.Path(args.build) / f"{args.dtype}_sm{args.arch}" / binary_name(tile, split)
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [args.nvcc, "-std=c++17", "-O3", f"-gencode=arch=compute_{args.arch},code=sm_{args.arch}",
           "-I", str(ROOT / "include"), f"-DCCE_TUNE_TYPE={TYPES[args.dtype]}",
           "-DCCE_TUNE_POLICY_PARAMS=" + "/".join(map(str, tile + (split,))), str(ROOT / "bench" / "tune" / "candidate.cu"),
           "-lcublas", "-o", str(out) + ".tmp"]
    subprocess.run(cmd, check=True)
    os.replace(str(out) + ".tmp", out)
    return out


def compile_all(args, candidates):
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        return dict(zip(candidates, pool.map(lambda c: compile_candidate(args, *c), candidates)))


def run_rounds(args, binaries):
    """Times every candidate once per round, rounds interleaved; returns {candidate: [results]}."""
    results = {c: [] for c in binaries}
    for _ in range(args.rounds):
        for cand, exe in binaries.items():
            out = subprocess.run([str(exe), str(args.n), str(args.d), str(args.v), str(args.softcap), "1",
                                  str(args.iterations)], check=True, capture_output=True, text=True).stdout
            results[cand].append(json.loads(out))
    return results


def score(runs, key="fwbw_ms"):
    return statistics.median(r[key] for r in runs)


def best_of(results, default, margin):
    best = min(results, key=lambda c: score(results[c]))
    return best if score(results[best]) < (1 - margin) * score(results[default]) else default


def header(args, chosen, results, default, device):
    opts = RECOMMENDED.get(args.name, {})
    runner_up = min((c for c in results if c != chosen), key=lambda c: score(results[c]))
    why = ("no candidate beat the default by more than {:.0%}".format(args.margin) if chosen == default else
           f"the default policy: {score(results[default]):.2f} ms")
    lines = [f"// Preset for {args.name}: D = {args.d}, V = {args.v}, {args.dtype}. Measured by bench/tune/tune.py on "
             f"{device}, {datetime.date.today()},",
             f"// N = {args.n} tokens of lm-like data, forward + chunked backward: {score(results[chosen]):.2f} ms; "
             f"{why};",
             f"// next best {policy_type(*runner_up)}: {score(results[runner_up]):.2f} ms.",
             "#pragma once", "", "#include <cce/options.hpp>", "#include <cce/tile/policy.hpp>", "",
             "namespace cce::presets {", "",
             f"using {args.name} = {policy_type(*chosen)};", "",
             f"// The options {args.name} is trained with" + (":" if opts else " (the defaults)."),
             f"inline options {args.name}_options() {{", "  options o;"]
    lines += [f"  o.{k} = {v}f;" for k, v in opts.items()]
    lines += ["  return o;", "}", "", "}  // namespace cce::presets", ""]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True, help="preset name, a C++ identifier (e.g. llama3)")
    ap.add_argument("--d", type=int, required=True)
    ap.add_argument("--v", type=int, required=True)
    ap.add_argument("--n", type=int, default=8192, help="tokens per call")
    ap.add_argument("--dtype", choices=TYPES, default="bf16")
    ap.add_argument("--arch", default="90a", help="nvcc arch of the binaries (90a, 80, ...)")
    ap.add_argument("--softcap", type=float, default=None, help="default: the model's recommended value or 0")
    ap.add_argument("--out", default=str(ROOT / "include" / "cce" / "presets"))
    ap.add_argument("--build", default=str(ROOT / "build-tune"))
    ap.add_argument("--jobs", type=int, default=os.cpu_count())
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--margin", type=float, default=0.01)
    ap.add_argument("--nvcc", default=os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"))
    args = ap.parse_args()
    if args.softcap is None:
        args.softcap = RECOMMENDED.get(args.name, {}).get("softcap", 0.0)
    try:
        device = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                text=True).stdout.strip().splitlines()[0]
    except (OSError, IndexError):
        device = "an unnamed GPU"

    default = (DEFAULT_TILE, DEFAULT_SPLIT)
    stage1 = [(t, DEFAULT_SPLIT) for t in TILES] + [(DEFAULT_TILE, s) for s in SPLITS if s != DEFAULT_SPLIT]
    results = run_rounds(args, compile_all(args, stage1))
    tile = best_of({c: r for c, r in results.items() if c[1] == DEFAULT_SPLIT}, default, args.margin)[0]
    split = best_of({c: r for c, r in results.items() if c[0] == DEFAULT_TILE}, default, args.margin)[1]
    if (tile, split) not in results:  # stage 2: the combination, timed against the default once more
        results.update(run_rounds(args, compile_all(args, [(tile, split), default])))
    chosen = best_of({c: results[c] for c in {(tile, split), default}}, default, args.margin)

    print(f"| {args.name} | candidate | fw ms | fw+bw ms | fw / GEMM | fw+bw / GEMM |")
    print("|---|---|---|---|---|---|")
    for cand, runs in sorted(results.items(), key=lambda kv: score(kv[1])):
        mark = " **chosen**" if cand == chosen else (" (default)" if cand == default else "")
        gemm = score(runs, "gemm_ms")
        print(f"| | `{policy_type(*cand)}`{mark} | {score(runs, 'fw_ms'):.3f} | {score(runs):.3f} | "
              f"{score(runs, 'fw_ms') / gemm:.2f} | {score(runs) / gemm:.2f} |")
    text = header(args, chosen, results, default, device)
    path = pathlib.Path(args.out) / f"{args.name}.hpp"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()

"""Every Triton kernel specialization the host wrappers launch, compiled for real GPUs (sm_80, sm_86, sm_89, sm_90) on
CPU.

The interpreter (tests/test_kernels.py) checks numerics but compiles nothing. Here the host wrappers
(`triton_gated_hira`, `triton_gated_lora`, and the token gate's row kernels of `kernels/rows.py` at two widths) run
forward and backward with every dtype (fp32, fp16, bf16) × W0 (dense,
NF4; for fp16 / bf16 also W0 stored in another dtype, `MIXED_WEIGHTS`) × gated/ungated × rank (8-512), with the device's shared memory set to the architecture's, and their launches
are recorded instead of run: the specializations compiled are therefore exactly those the wrappers' own block
choice (`kernels.blocks.choose_blocks`) and Triton's argument specialization produce. Each distinct one is compiled by
Triton's own compiler for a CUDA target, with the ptxas the triton wheel bundles, in a subprocess without
TRITON_INTERPRET (which conftest sets). The test fails on a compile error, on shared memory above the architecture's
opt-in limit or above the bound the block choice assumed, on register spills in fp16/bf16 kernels, or on a pointer
offset or index product computed in int32; it prints the table (kernel × arch × dtype × W0 × gate → tiles, shared
memory, registers, spills).

Run alone: `python tests/test_kernel_compile.py` prints the table, README's summary of it and any problem (no GPU
needed).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.version import Version

triton_module = pytest.importorskip("triton")
pytest.importorskip("bitsandbytes")  # the NF4 specializations

# opt-in shared memory per block: A100; RTX 30xx, A10; RTX 40xx, L4; H100 / H200
ARCHS = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
# reported on request only (`python tests/test_kernel_compile.py --arch 75`), not checked: a T4's kernels spill in
# fp16 / bf16, and kernel="auto" never launches the branch kernels there (README, "Kernels")
REPORTED_ARCHS = {75: 64 * 1024}
DTYPES = ("float32", "float16", "bfloat16")
RANKS = (8, 16, 32, 64, 128, 256, 512)
SHAPE = (128, 128, 192)  # tokens, d_in, d_out: multiples of 16 (as LLaMA's), at least one full tile each way
ROW_WIDTH = 14336  # LLaMA's MLP width: the row kernels' widest chunk (2048 columns, 8 warps), looped over
ROW_KERNELS = ("scale_rows", "scale_rows_dot")
# compute dtype -> W0s stored in another dtype, "kind:dtype": an fp32 model under half autocast, and an NF4 base
# quantised from a bf16 / fp16 checkpoint run in the other half dtype
MIXED_WEIGHTS = {"float16": ("dense:float32", "nf4:bfloat16"), "bfloat16": ("dense:float32", "nf4:float16")}
ROOT = Path(__file__).resolve().parent.parent


def _record_launches(arch: int) -> list[tuple]:
    """Run the host wrappers with launches recorded: [(jit function, args, kwargs, tags)]."""
    import torch
    from triton.runtime.jit import JITFunction

    import gatera_plugin.kernels.blocks as blocks
    import gatera_plugin.kernels.hira_triton as hira
    import gatera_plugin.kernels.rows as row_kernels
    from gatera_plugin.kernels import SMEM_BY_CAPABILITY
    from gatera_plugin.kernels.lora_triton import triton_gated_lora

    launches, tags = [], {}
    JITFunction.run = lambda self, *args, grid, warmup, **kwargs: launches.append((self, args, kwargs, dict(tags)))
    blocks.device_smem = lambda device: SMEM_BY_CAPABILITY[(arch // 10, arch % 10)]
    n, d_in, d_out = SHAPE
    for dtype_name in DTYPES:
        dtype = getattr(torch, dtype_name)
        for weight in ("dense", "nf4", "-", *MIXED_WEIGHTS.get(dtype_name, ())):
            kind, _, weight_dtype = weight.partition(":")
            for gated in (True, False):
                for r in RANKS:
                    tags.update(arch=arch, dtype=dtype_name, weight=weight, gate="gated" if gated else "ungated", r=r)
                    g = torch.Generator().manual_seed(0)
                    x, base = torch.randn(n, d_in, generator=g), torch.randn(n, d_out, generator=g)
                    A, B = torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g)
                    gate = torch.rand(n, 1, generator=g) if gated else None
                    leaves = [t.to(dtype).requires_grad_() if t is not None else None for t in (x, A, B, base)]
                    x, A, B, base = leaves  # (the gate stays fp32: the layers pass it so)
                    gate = gate.requires_grad_() if gated else None
                    if weight == "-":  # LoRA: no W0
                        out = triton_gated_lora(x, gate, A, B, 0.5, base=base)
                    else:
                        W = torch.randn(d_out, d_in, generator=g).to(getattr(torch, weight_dtype or dtype_name))
                        weight_fn = _weight_fn(kind, W)
                        out = hira.triton_gated_hira(x, gate, A, B, weight_fn, 0.5, base=base)
                    out.backward(torch.ones_like(out))
    for dtype_name in DTYPES:  # the token gate's row kernels: a layer's width in one chunk and in several
        dtype = getattr(torch, dtype_name)
        tags.update(arch=arch, dtype=dtype_name, weight="-", gate="gated", r=0)
        for d in (SHAPE[1], ROW_WIDTH):
            a, b, scale = torch.randn(n, d).to(dtype), torch.randn(n, d).to(dtype), torch.rand(n, 1).to(dtype)
            row_kernels.scale_rows(a, scale)
            row_kernels.scale_rows(a, scale, base=b, out=a)
            row_kernels.scale_rows_and_dot_(a, b, scale)
            row_kernels.scale_rows_and_dot_(a.float(), b, scale)  # P summed over W0 blocks in fp32
    return launches


def _weight_fn(kind: str, W):
    if kind == "dense":
        return lambda: W
    import bitsandbytes as bnb

    from gatera_plugin.kernels.hira_triton import Packed4bit

    packed = Packed4bit.from_params(bnb.nn.Params4bit(W, requires_grad=False, quant_type="nf4").to("cpu"))
    return lambda: packed


_JOBS: list = []


def _compile(index: int) -> dict:
    """Compile job `index` (fork-inherited `_JOBS`) and measure it."""
    import contextlib
    import io

    import triton
    from triton.compiler import ASTSource

    fn, signature, constexprs, attrs, options, target = _JOBS[index]
    row = {"smem": None, "regs": None, "spills": None, "error": None, "int32_index": []}
    log = io.StringIO()
    try:
        triton.knobs.compilation.always_compile = True  # no cache hit: ptxas must run to report
        triton.knobs.nvidia.dump_ptxas_log = True  # the ptxas -v log of the very compile below
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options)
    except Exception as error:  # noqa: BLE001  (reported as a failing row)
        row["error"] = f"{type(error).__name__}: {str(error)[-2000:]}"
        return row
    text = log.getvalue()
    row["smem"] = kernel.metadata.shared
    row["regs"] = int(re.search(r"Used (\d+) registers", text).group(1))
    row["spills"] = sum(int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", text))
    for line in kernel.asm["ttir"].splitlines():  # index arithmetic on tensors must be int64
        if re.search(r"(tt\.addptr .*, tensor<[0-9x]+xi32>|arith\.muli .*: tensor<[0-9x]+xi32>)", line):
            row["int32_index"].append(re.sub(r" loc\(.*", "", line.strip()))
    return row


def measure(workers: int, archs=tuple(ARCHS)) -> list[dict]:
    """One row per distinct compiled specialization (ranks that share it are listed together), for each of `archs`."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    from gatera_plugin.kernels.blocks import Blocks

    rows, keys = [], {}
    for arch in archs:
        target = GPUTarget("cuda", arch, 32)
        backend = make_backend(target)
        for fn, args, kwargs, tags in _record_launches(arch):
            binder = create_function_from_signature(fn.signature, fn.params, backend)
            bound, specialization, opts = binder(*args, **kwargs)
            options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, opts)
            key = (fn.__name__, arch, str(sorted(signature.items())), str(sorted(constexprs.items())),
                   str(sorted(attrs.items())), str(options))
            if key in keys:
                rows[keys[key]]["ranks"].append(tags["r"])
                continue
            keys[key] = len(rows)
            _JOBS.append((fn, signature, constexprs, attrs, options.__dict__, target))
            name = fn.__name__.strip("_").removesuffix("_kernel")
            if name in ROW_KERNELS:  # one row per program, BLOCK columns at a time; shared memory only for the sum
                tiles, bound = f"1x{kwargs['BLOCK']}x-/r- w{kwargs['num_warps']} s1", 4 * kwargs["BLOCK"]
            else:
                blocks = Blocks(kwargs.get("BM", 0), kwargs["BN"], kwargs.get("BK", 16), kwargs.get("RB", 0),
                                kwargs["num_warps"], kwargs["num_stages"])
                tiles = (f"{blocks.BM or '-'}x{blocks.BN}x{kwargs.get('BK', '-')}/r{blocks.RB} w{blocks.num_warps}"
                         f" s{blocks.num_stages}")
                bound = blocks.smem_bound(name, {"float32": 4}.get(tags["dtype"], 2))
            rows.append({"kernel": name, **{k: tags[k] for k in ("arch", "dtype", "weight", "gate")},
                         "ranks": [tags["r"]], "tiles": tiles, "bound": bound})
    with ProcessPoolExecutor(workers, mp_context=get_context("fork")) as pool:
        for row, measured in zip(rows, pool.map(_compile, range(len(rows)))):
            row.update(measured)
    return rows


def table(rows: list[dict]) -> str:
    head = f"{'kernel':<12} {'arch':<5} {'dtype':<8} {'W0':<13} {'gate':<8} {'ranks':<11} {'tiles':<24} " \
           f"{'smem':>7} {'regs':>5} {'spills':>6}"
    lines = [head, "-" * len(head)]
    for row in rows:
        ranks = "-" if max(row["ranks"]) == 0 else "8-16" if max(row["ranks"]) <= 16 else \
            f"{min(row['ranks'])}-{max(row['ranks'])}"
        lines.append(f"{row['kernel']:<12} sm_{row['arch']:<2} {row['dtype']:<8} {row['weight']:<13} {row['gate']:<8} "
                     f"{ranks:<11} {row['tiles']:<24} {row['smem'] if row['smem'] is not None else 'ERROR':>7} "
                     f"{row['regs'] or '':>5} {row['spills'] if row['spills'] is not None else '':>6}")
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    """Markdown, kernel × dtype → per arch the tiles and the largest shared memory, registers, spills (README)."""
    archs = list(dict.fromkeys(row["arch"] for row in rows))
    lines = ["| kernel | dtype | tiles (BMxBNxBK, stages) | " + " | ".join(
        f"sm_{arch} smem KiB / regs / spill bytes" for arch in archs) + " |", "| --- | --- | --- |" + " --- |" * len(archs)]
    seen = dict.fromkeys((row["kernel"], row["dtype"]) for row in rows)
    for kernel, dtype in seen:
        cells, tiles = [], set()
        for arch in archs:
            group = [row for row in rows if (row["kernel"], row["dtype"], row["arch"]) == (kernel, dtype, arch)]
            tiles |= {row["tiles"].split("/")[0] + ", " + row["tiles"].split()[-1] for row in group}
            cells.append(f"{max(row['smem'] or 0 for row in group) / 1024:.0f} / {max(row['regs'] or 0 for row in group)}"
                         f" / {max(row['spills'] or 0 for row in group)}")
        lines.append(f"| {kernel} | {dtype} | {'; '.join(sorted(tiles))} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def problems(rows: list[dict]) -> list[str]:
    found = []
    for row in rows:
        where = f"{row['kernel']} sm_{row['arch']} {row['dtype']} {row['weight']} {row['gate']} r={row['ranks']}"
        if row["error"]:
            found.append(f"{where}: compile error {row['error']}")
            continue
        limit = {**ARCHS, **REPORTED_ARCHS}[row["arch"]]
        if row["smem"] > limit:
            found.append(f"{where}: {row['smem']} bytes of shared memory > sm_{row['arch']}'s {limit}")
        if row["smem"] > row["bound"]:
            found.append(f"{where}: {row['smem']} bytes of shared memory > Blocks.smem_bound {row['bound']}")
        if row["spills"] and row["dtype"] != "float32":
            found.append(f"{where}: {row['spills']} bytes of register spills")
        if row["int32_index"]:
            found.append(f"{where}: int32 index arithmetic: {row['int32_index'][:3]}")
    return found


@pytest.mark.slow
@pytest.mark.skipif(Version(triton_module.__version__) < Version("3.5"),
                    reason="the compile check uses Triton's compiler internals of triton >= 3.5")
def test_every_launched_kernel_compiles_for_each_arch(capsys):
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    done = subprocess.run([sys.executable, __file__, "--json"], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=1500)
    assert done.returncode == 0, done.stderr[-5000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    with capsys.disabled():
        print("\n" + table(rows))
    combos = {(r["kernel"], r["arch"], r["dtype"], r["weight"], r["gate"]) for r in rows}
    # the HiRA chunk kernels do not see the gate (the PyTorch ops around them apply it): gated and ungated runs
    # launch the same specializations, recorded under the first ("gated")
    hira = {(k, a, d, w, "gated") for k in ("hira_delta", "hira_mask") for a in ARCHS for d in DTYPES
            for w in ("dense", "nf4", *MIXED_WEIGHTS.get(d, ()))}
    lora = {(k, a, d, "-", g) for k in ("lora_fwd", "lora_bwd_db") for a in ARCHS for d in DTYPES
            for g in ("gated", "ungated")}
    row_ops = {(k, a, d, "-", "gated") for k in ROW_KERNELS for a in ARCHS for d in DTYPES}
    assert combos == hira | lora | row_ops
    assert all(sorted({r for row in rows if row["kernel"] == k and row["arch"] == 80 and row["dtype"] == "bfloat16"
                       and row["weight"] in ("dense", "-") and row["gate"] == "gated" for r in row["ranks"]})
               == list(RANKS) for k in ("hira_delta", "lora_fwd"))
    assert problems(rows) == []


def test_problems_names_each_limit():
    """The checks themselves (no compiling): each limit, on a row that breaks only it."""
    ok = {"kernel": "hira_delta", "arch": 80, "dtype": "bfloat16", "weight": "dense", "gate": "gated", "ranks": [32],
          "tiles": "", "bound": 60000, "smem": 14336, "regs": 160, "spills": 0, "error": None, "int32_index": []}
    assert problems([ok]) == []
    for change, expected in [({"smem": 170000, "bound": 10**6}, "> sm_80's 166912"),
                             ({"smem": 70000}, "> Blocks.smem_bound 60000"),
                             ({"spills": 8}, "8 bytes of register spills"),
                             ({"int32_index": ["tt.addptr %p, %o : tensor<64x!tt.ptr<f32>>, tensor<64xi32>"]},
                              "int32 index arithmetic"),
                             ({"error": "CompilationError: boom"}, "compile error CompilationError: boom")]:
        found = problems([{**ok, **change}])
        assert len(found) == 1 and expected in found[0], (change, found)
    assert problems([{**ok, "dtype": "float32", "spills": 16}]) == []  # fp32 may spill


if __name__ == "__main__":
    os.environ["TRITON_INTERPRET"] = "0"
    sys.path.insert(0, str(ROOT))
    archs = [int(sys.argv[sys.argv.index("--arch") + 1])] if "--arch" in sys.argv else list(ARCHS)  # e.g. --arch 75
    if not set(archs) <= {*ARCHS, *REPORTED_ARCHS}:
        sys.exit(f"--arch: one of {sorted({*ARCHS, *REPORTED_ARCHS})} (their shared memory is in ARCHS / REPORTED_ARCHS)")
    measured = measure(workers=max(1, min(4, os.cpu_count() or 1)), archs=archs)
    if "--json" in sys.argv:
        print(json.dumps(measured))
    else:
        print(table(measured), summary(measured), "\n".join(problems(measured)) or "no problems", sep="\n\n")

"""Compile every Triton kernel ahead of time for NVIDIA targets, without a GPU.

The CPU interpreter checks the kernels' logic but not that they lower to PTX: this builds them
through Triton's full pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin with the bundled ptxas)
for each requested compute capability and prints registers and spills.

    python -m ipa_fast.kernels.compile_check [--arch 80 90]     (TRITON_INTERPRET must be unset)
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import log_softmax_triton as lst
from . import sampler_triton as st


def _ptr(t: str) -> str:
    return "*" + t


def sampler_cases(dtype: str, k: int, first: int = 0):
    """(kernel, argument types, constexprs, options) for the four sampler kernels over ``k``
    experts (a tuple of pointers and of row strides); ``first`` = 1 is the two-expert entry."""
    types = dict(X=tuple(_ptr(dtype) for _ in range(k)), ST=tuple("i64" for _ in range(k)), W="*fp32", WS="i32",
                 temp_ptr="*fp32", V="i32",
                 S="i32", ch_m_ptr="*fp32", ch_se_ptr="*fp32", ch_idx_ptr="*i32", ch_bad_ptr="*i32",
                 ch_fin_ptr="*i32", ch_hist_ptr="*i32", topk_ptr="*i64", topp_ptr="*fp32", minp_ptr="*fp32",
                 ch_shift_ptr="*i32", ch_off_ptr="*i32", row_m_ptr="*fp32", row_lse_ptr="*fp32",
                 row_se_ptr="*fp32", row_mode_ptr="*i32", row_j_ptr="*i32", row_n_ptr="*i32", tok_ptr="*i64",
                 lp_ptr="*fp32", flp_ptr="*fp32", valid_ptr="*i1", CAP="i32", cand_z_ptr="*fp32",
                 cand_i_ptr="*i32", seed_ptr="*i64", off_ptr="*i64")
    chunk = st.chunk_size(128256)
    hist = dict(K=k, FIRST=first, CHUNK=chunk, NB=st.NB, R=st.R)
    return [
        (st._stats_kernel, types, hist, dict(num_warps=4)),
        (st._merge_kernel, types, dict(SP=64, NB=st.NB, R=st.R), dict(num_warps=4)),
        (st._gather_kernel, types, hist, dict(num_warps=4)),
        (st._finish_kernel, types, dict(K=k, FIRST=first, CHUNK=chunk, SP=64, BLOCK=st.BLOCK, NPIV=st.NPIV,
                                                  PAIR=st.PAIR, PCH=st.PCH),
         dict(num_warps=8)),
    ]


def log_softmax_cases(dtype: str):
    fwd = dict(X=(_ptr(dtype), _ptr(dtype)), ST=("i64", "i64"), W="*fp32", WS="i32", temp_ptr="*fp32",
               out_ptr="*fp32", lse_ptr="*fp32", V="i32")
    bwd = dict(grad_ptr="*fp32", out_ptr="*fp32", alpha_ptr="*fp32", temp_ptr="*fp32", gbase_ptr="*fp32",
               gadapter_ptr="*fp32", V="i32")
    return [(lst._forward_kernel, fwd, dict(K=2, FIRST=1, BLOCK=lst.BLOCK), dict(num_warps=8)),
            (lst._backward_kernel, bwd, dict(HAS_ADAPTER=True, BLOCK=lst.BLOCK), dict(num_warps=8))]


def compile_one(fn, types, constexprs, options, arch: int):
    if not isinstance(fn, triton.runtime.jit.JITFunction):
        raise RuntimeError("TRITON_INTERPRET is set: the kernels are interpreted functions, not compilable")
    signature = {name: ("constexpr" if name in constexprs else types[name]) for name in fn.arg_names}
    src = ASTSource(fn=fn, signature=signature,
                    constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(enable_fp_fusion=False, **options))


def ptxas_report(kernel, arch: int) -> str:
    from triton.backends.nvidia.compiler import get_ptxas
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(kernel.asm["ptx"])
    try:
        out = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name=sm_{arch}a" if arch >= 90 else f"--gpu-name=sm_{arch}",
                              f.name, "-o", os.devnull], capture_output=True, text=True).stderr
    finally:
        os.unlink(f.name)
    keep = [line.split(":", 1)[-1].strip() for line in out.splitlines() if "registers" in line or "spill" in line]
    return "; ".join(keep)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--quiet", action="store_true", help="no ptxas register report")
    args = ap.parse_args(argv)
    cases = sampler_cases("fp32", 2, 1) + sampler_cases("bf16", 1, 1)[::2] + sampler_cases("bf16", 3)[::3] + \
        log_softmax_cases("bf16")
    for arch in args.arch:
        for fn, types, constexprs, options in cases:
            kernel = compile_one(fn, types, constexprs, options, arch)
            report = "" if args.quiet else ptxas_report(kernel, arch)
            print(f"sm_{arch} {fn.__name__:18s} ok  {report}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Compile every JTok kernel for a CUDA architecture without a GPU, and report registers and spills.

    python -m jtok_kernels.compile_check                      # sm_90, bf16 and fp32
    python -m jtok_kernels.compile_check --arch 80 --dtype bf16

Triton's compiler and its bundled ptxas run on any machine, so this checks what the interpreter cannot:
that the kernels lower to a cubin (types, layouts, loops) at the block sizes the autograd Functions launch
with, and whether a kernel spills registers to local memory. It must run with TRITON_INTERPRET unset.
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

from jtok_kernels import INTERPRET_HINT, interpreted
from jtok_kernels import jtok as jtok_kernels
from jtok_kernels import jtokm as jtokm_kernels
from jtok_kernels import segment as segment_kernels
from jtok_kernels._common import BLOCK_P, MAX_BLOCK_D, SEGMENT_BLOCK_D

__all__ = ["KERNELS", "compile_kernel", "compile_all", "main"]

KERNELS = {
    "segment_sum": segment_kernels._segment_sum_kernel,
    "jtok row norm": jtok_kernels._row_inv_norm_kernel,
    "jtok gate fwd": jtok_kernels._gate_fwd_kernel,
    "jtok gate bwd (segments)": jtok_kernels._gate_bwd_segment_kernel,
    "jtok l2n bwd": jtok_kernels._l2n_bwd_kernel,
    "jtokm blend fwd": jtokm_kernels._blend_fwd_kernel,
    "jtokm blend bwd (positions)": jtokm_kernels._blend_bwd_pos_kernel,
    "jtokm blend bwd (rows)": jtokm_kernels._blend_bwd_rows_kernel,
}
_INDEX = {"inverse", "top_idx", "order", "offsets"}
_FP32 = {"inv_norm", "norm_out", "norm_in", "gamma_out", "gamma_in", "dn", "ds_part"}
_SCALARS = {"RS": "i64", "D": "i32", "NE": "i32", "K": "i32", "eps": "fp32", "depth": "fp32"}
_TYPES = {"bf16": "bf16", "fp32": "fp32", "fp16": "fp16"}


def _signature(fn, dtype: str) -> tuple[dict, dict]:
    sig, constexprs = {}, {}
    for name in fn.arg_names:
        if name.startswith("BLOCK_"):
            sig[name] = "constexpr"
            constexprs[name] = {"BLOCK_K": 2, "BLOCK_NE": 16, "BLOCK_P": BLOCK_P}.get(name, MAX_BLOCK_D)
        elif name in _SCALARS:
            sig[name] = _SCALARS[name]
        elif name in _INDEX:
            sig[name] = "*i64"
        elif name in _FP32:
            sig[name] = "*fp32"
        else:
            sig[name] = "*" + _TYPES[dtype]
    if "BLOCK_P" in constexprs:        # segment loops: column blocks as the autograd Functions launch them
        constexprs["BLOCK_D"] = SEGMENT_BLOCK_D
    if fn is jtokm_kernels._blend_bwd_rows_kernel:
        constexprs["BLOCK_D"] = SEGMENT_BLOCK_D // 2
    return sig, constexprs


def _resources(cubin: bytes) -> dict:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    fields = {}
    for line in out.splitlines():
        if "REG:" in line:
            fields = dict(tok.split(":", 1) for tok in line.split() if ":" in tok)
    return {"registers": int(fields.get("REG", -1)), "spill_bytes": int(fields.get("LOCAL", -1)),
            "stack_bytes": int(fields.get("STACK", -1))}


def compile_kernel(fn, arch: int, dtype: str) -> dict:
    sig, constexprs = _signature(fn, dtype)
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=GPUTarget("cuda", arch, 32))
    return {**_resources(kernel.asm["cubin"]), "num_warps": kernel.metadata.num_warps,
            "blocks": {k: v for k, v in constexprs.items()}}


def compile_all(arch: int = 90, dtypes: tuple[str, ...] = ("bf16", "fp32")) -> list[dict]:
    if interpreted():
        raise RuntimeError(f"compile_check: the kernels were decorated for the interpreter; {INTERPRET_HINT}")
    return [{"kernel": name, "dtype": dt, "arch": f"sm_{arch}", **compile_kernel(fn, arch, dt)}
            for dt in dtypes for name, fn in KERNELS.items()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (80 = A100, 90 = H100)")
    p.add_argument("--dtype", nargs="+", choices=sorted(_TYPES), default=["bf16", "fp32"])
    args = p.parse_args(argv)
    rows = compile_all(args.arch, tuple(args.dtype))
    print("| kernel | dtype | arch | warps | registers | spill bytes |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kernel']} | {r['dtype']} | {r['arch']} | {r['num_warps']} | {r['registers']} | {r['spill_bytes']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

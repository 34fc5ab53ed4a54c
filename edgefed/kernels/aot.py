"""Compile the kernels ahead of time for a GPU architecture, without a GPU (Triton's AOT path).

    python -m edgefed.kernels.aot --arch 87      # Jetson Orin: prints shared memory per kernel, JSON

Used by the tests to prove that the CUDA block configurations fit Orin's 163 KB of shared memory
per block. Must run without TRITON_INTERPRET (interpreted kernels cannot be compiled).
"""

from __future__ import annotations

import argparse
import json
import os

# Orin (sm_87): 164 KB shared memory per SM, at most 163 KB for one block.
SHARED_LIMIT = {87: 163 * 1024, 80: 163 * 1024, 90: 227 * 1024}


def _signature(kernel, pointer_types: dict[str, str], constexprs: dict) -> dict[str, str]:
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = pointer_types.get(name, pointer_types["default"])
        else:
            signature[name] = "fp32" if name == "scale" else "i32"
    return signature


def compile_kernels(arch: int) -> dict[str, int]:
    """Shared memory in bytes of each kernel configuration edgefed launches on CUDA."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from edgefed.kernels import triton_lora, triton_reduce
    from edgefed.kernels.lora import _blocks

    blocks = _blocks(4096)
    fp32 = {"s_ptr": "*fp32", "ds_ptr": "*fp32", "db_ptr": "*fp32"}
    cases = []
    for dtype in ("fp16", "bf16", "fp32"):
        flags = {"UPCAST": False, "IEEE": dtype == "fp32", "R_BLOCK": 64}
        pointers = {"default": f"*{dtype}", **fp32}
        cases += [
            (
                f"lora_forward_{dtype}",
                triton_lora.lora_forward_kernel,
                pointers,
                {"HAS_BIAS": True, **flags, **blocks},
            ),
            (
                f"lora_backward_ds_db_{dtype}",
                triton_lora.lora_backward_ds_db_kernel,
                pointers,
                {**flags, "BLOCK_T": blocks["BLOCK_T"], "BLOCK_O": blocks["BLOCK_O"]},
            ),
            (f"lora_backward_dx_{dtype}", triton_lora.lora_backward_dx_kernel, pointers, {**flags, **blocks}),
        ]
    for mode, q_type in ((0, "*fp16"), (1, "*i8"), (2, "*u8")):
        cases.append(
            (
                f"weighted_sum_mode{mode}",
                triton_reduce.weighted_sum_kernel,
                {"default": "*fp32", "q_ptr": q_type},
                {"MODE": mode, "QBLOCK": 64, "BLOCK_N": 1024},
            )
        )
    shared = {}
    for name, kernel, pointers, constexprs in cases:
        source = ASTSource(kernel, _signature(kernel, pointers, constexprs), constexprs=constexprs)
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4})
        shared[name] = compiled.metadata.shared
    return shared


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=87)
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    print(
        json.dumps(
            {"arch": args.arch, "limit": SHARED_LIMIT.get(args.arch), "shared": compile_kernels(args.arch)}
        )
    )


if __name__ == "__main__":
    main()

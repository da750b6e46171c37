"""Compile every Triton kernel for an sm_90 target without a GPU (run by test_kernels_triton.py).

Under TRITON_INTERPRET=1 the kernels run as Python, which accepts code the real compiler rejects
(type mismatches across branches, constexpr rules). This script compiles each kernel down to a
cubin so such errors show up on machines without CUDA. Exit status 77: no CUDA compiler backend.
"""
import importlib
import os
import sys

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("run without TRITON_INTERPRET=1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    importlib.import_module("triton.backends.nvidia.compiler")
except ImportError as e:
    print(f"no CUDA compiler backend in this Triton: {e}")
    sys.exit(77)

from sparse_sam.kernels import patch_swap, sam_conv, sam_weight  # noqa: E402

topk = importlib.import_module("sparse_sam.kernels.topk_mask")
TARGET = GPUTarget("cuda", 90, 32)


def compile_one(fn, signature, constexprs, **options):
    sig = dict(signature, **{k: "constexpr" for k in constexprs})
    triton.compile(ASTSource(fn, sig, constexprs), target=TARGET, options=options)
    print("compiled", fn.__name__, constexprs, flush=True)


def main():
    i32, i64 = "i32", "i64"
    blk = dict(blk_seg_ptr="*i32", blk_start_ptr="*i64")
    compile_one(topk._topk_hist_kernel, dict(seg_addr_ptr="*i64", **blk, seg_len_ptr="*i64", seg_k_ptr="*i64",
                                             seg_nblk_ptr="*i32", hist_ptr="*i32", ticket_ptr="*i32",
                                             nan_ptr="*i32", sel_ptr="*i32"),
                dict(SDT=tl.float32, BLOCK=topk.BLOCK, NBINS=topk.NBINS, SCAN_CHUNK=topk.SCAN_CHUNK), num_warps=8)
    compile_one(topk._topk_select_kernel, dict(seg_addr_ptr="*i64", mask_ptr="*i8", **blk, seg_off_ptr="*i64",
                                               seg_len_ptr="*i64", seg_nblk_ptr="*i32", sel_ptr="*i32",
                                               cand_ptr="*i32", cand_cnt_ptr="*i32", ticket_ptr="*i32"),
                dict(SDT=tl.bfloat16, BLOCK=topk.BLOCK, NBINS=topk.NBINS, REFINE_BLOCK=topk.REFINE_BLOCK),
                num_warps=8)
    for wd, vd, sd in [("fp32", "fp32", "fp32"), ("bf16", "fp16", "fp32"), ("fp16", "fp16", "bf16")]:
        compile_one(sam_weight._sam_weight_fwd_kernel,
                    dict(w_ptr="*" + wd, m_ptr="*u8", v_ptr="*" + vd, out_ptr="*" + wd, n=i64),
                    dict(CD=tl.float32, BLOCK=sam_weight.BLOCK), num_warps=8)
        compile_one(sam_weight._sam_weight_bwd_kernel,
                    dict(g_ptr="*" + wd, m_ptr="*u8", v_ptr="*" + vd, gd_ptr="*" + vd, gs_ptr="*" + sd, n=i64),
                    dict(MASKED=True, CD=tl.float32, BLOCK=sam_weight.BLOCK), num_warps=8)
    compile_one(sam_weight._sam_weight_fwd_grouped_kernel,
                dict(**{a: "*i64" for a in ("w_addr_ptr", "m_addr_ptr", "v_addr_ptr", "len_ptr", "out_off_ptr",
                                            "blk_layer_ptr", "blk_start_ptr")}, out_ptr="*bf16"),
                dict(WD=tl.bfloat16, VD=tl.float32, CD=tl.float32, BLOCK=sam_weight.BLOCK), num_warps=8)
    compile_one(patch_swap._swap_kernel, {a: "*i64" for a in ("w_addr_ptr", "v_addr_ptr", "numel_ptr", "idx_ptr",
                                                             "idx_off_ptr", "len_ptr", "blk_layer_ptr",
                                                             "blk_start_ptr")},
                dict(BITS=tl.int16, BLOCK=patch_swap.BLOCK), num_warps=4)
    for dt, prec in (("fp16", "ieee"), ("fp32", "tf32"), ("bf16", "ieee")):
        sig = dict(x_ptr="*" + dt, w_ptr="*" + dt, m_ptr="*u8", v_ptr="*" + dt, b_ptr="*" + dt, out_ptr="*" + dt,
                   **{a: i32 for a in "N C H W CO OH OW KH KW sh sw ph pw dh dw".split()})
        for transposed in (False, True):
            compile_one(sam_conv._sam_conv_kernel, sig,
                        dict(TRANSPOSED=transposed, HAS_BIAS=transposed, CD=tl.float32, PREC=prec, DOT_F32=False,
                             BLOCK_M=128, BLOCK_N=64, BLOCK_K=32), num_warps=4, num_stages=3)


if __name__ == "__main__":
    main()

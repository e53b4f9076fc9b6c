"""Compiles, with Triton's real compiler and ptxas (no GPU needed), every variant of quant/kernels/triton_kernels.py's
kernels that the runtime (quant/kernels/ops_triton.py) launches for DiT-XL/2 and DiT-S/2, for sm_90 (H100/H200) and
sm_80 (A100), and checks the code: int8 warpgroup MMAs (wgmma) on sm_90 for 64-row tiles and up, int8 mma.sync
otherwise, shared memory within the architecture's limit, IEEE divisions in the activation pass. Run by
tests/test_ops_triton.py; prints one line a variant and a last line "compiled N variants" (or the failures).
Usage: python tests/compile_kernels.py [PROCESSES]
"""
import re
import sys
from concurrent.futures import ProcessPoolExecutor

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from quant.kernels import ops_triton as ot, triton_kernels

SHARED = {90: 232448, 80: 166912}  # bytes of shared memory a block may use (H100/H200, A100)
GEMM = dict(a_ptr="*i8", w_ptr="*i8", c_ptr="*i16", cb_ptr="*i32", d_ptr="*i32", sw_ptr="*fp32", gsum_ptr="*i32",
            e_ptr="*i64", sx_ptr="*fp32", lp_ptr="*fp32", l_ptr="*fp32", bias_ptr="*fp32", out_ptr="*bf16",
            M="i32", N="i32", K="i32", G="i32", NG="i32", RANK="i32", EMAX="i64")
ENCODE = dict(x_ptr="*bf16", s_ptr="*fp32", sx_ptr="*fp32", zx_ptr="*fp32", a_ptr="*i8", gsum_ptr="*i32",
              r_ptr="*fp32", lp_ptr="*fp32", M="i32", K="i32", G="i32", NG="i32", RANK="i32", stride_m="i32",
              stride_k="i32", LEVELS="fp32")
RANGE = dict(x_ptr="*bf16", s_ptr="*fp32", mn_ptr="*fp32", mx_ptr="*fp32", M="i32", K="i32", stride_m="i32",
             stride_k="i32")


def compile_ptx(job):
    """PTX and shared bytes of one kernel variant, specialised as Triton's launcher does (16-byte aligned pointers
    and integers divisible by 16 marked so)."""
    name, arch, sig, values, launch, consts = job
    fn = getattr(triton_kernels, name)
    names = list(sig)
    div = [n for n in names if sig[n].startswith("*") or values.get(n, 1) % 16 == 0]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in div}
    sig = dict(sig, **{c: "constexpr" for c in consts})
    k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", arch, 32),
                       options=dict(num_warps=launch.num_warps, num_stages=launch.num_stages))
    return job, k.asm["ptx"], k.metadata.shared


def runtime_jobs():
    """One job per distinct variant the runtime launches for DiT-XL/2 and DiT-S/2 at 256 and 512 px, batch 1 to 64
    with CFG, every group size QuantDiT.py accepts (the divisors of the width, and per channel), W8A8 and W4A8."""
    gemm, act = {}, {}
    for h, f in ((1152, 4608), (384, 1536)):
        for px in (256, 512):
            for b in range(1, 65):
                m = 2 * b * (px // 16) ** 2
                for n, k in ((3 * h, h), (h, h), (f, h), (h, f)):
                    for g in [g for g in range(1, h + 1) if h % g == 0] + [k]:
                        for arch in (90, 80):
                            run = ot.gemm_launch(m, n, g, arch)
                            for packed in (True, False):
                                gemm.setdefault((arch, run, g <= run.block_k, packed), (m, n, k, g))
                            act.setdefault((arch, ot.act_launch(k, g)), (m, k, g))
    jobs = []
    for (arch, run, one_step, packed), (m, n, k, g) in gemm.items():
        for wide in (False, True) if (run.block_m == 128 and not packed and one_step) else (False,):
            jobs.append(("int_gemm_kernel", arch, dict(GEMM, w_ptr="*u8" if packed else "*i8"),
                         dict(M=m, N=n, K=k, G=g), run,
                         dict(ONE_STEP=one_step, WIDE=wide, PACKED=packed, USE_SA=True, HAS_LORA=True, RANK_P=32,
                              HAS_BIAS=True, GELU=True, OUT_BF16=True, BLOCK_M=run.block_m, BLOCK_N=run.block_n,
                              BLOCK_K=run.block_k)))
    for (arch, run), (m, k, g) in act.items():
        jobs.append(("act_encode_kernel", arch, ENCODE, dict(M=m, K=k, G=g), run,
                     dict(HAS_SMOOTH=True, HAS_LORA=True, RANK_P=32, BLOCK_M=run.block_m, BLOCK_K=run.block_k)))
        jobs.append(("act_range_kernel", arch, RANGE, dict(M=m, K=k), ot.Launch(run.block_m, run.block_n, 0,
                     run.num_warps, run.num_stages), dict(HAS_SMOOTH=True, BLOCK_M=run.block_m, BLOCK_K=run.block_n)))
    return list({(j[0], j[1], repr(j[4]), repr(sorted(j[5].items()))): j for j in jobs}.values())


if __name__ == "__main__":
    jobs = runtime_jobs()
    failures = []
    with ProcessPoolExecutor(int(sys.argv[1]) if len(sys.argv) > 1 else 2) as pool:
        for (name, arch, _, values, run, consts), ptx, shared in pool.map(compile_ptx, jobs):
            mmas = set(re.findall(r"w?mma[\w.]*", ptx))
            what = f"{name} sm_{arch} {run} {values} {consts.get('PACKED', '')} {consts.get('WIDE', '')}"
            if shared > SHARED[arch]:
                failures.append(f"{what}: {shared} B shared")
            if name == "int_gemm_kernel":  # int8 x int8 -> int32 tensor-core MMAs of the architecture
                want = r"wgmma\.mma_async\.sync\.aligned\.m64n\d+k32\.s32\.s8\.s8" if arch == 90 and \
                    run.block_m >= 64 else r"\bmma\.sync\.aligned\.m16n8k32\.row\.col(\.satfinite)?\.s32\.s8\.s8"
                if not re.search(want, ptx):
                    failures.append(f"{what}: no {want} in {sorted(mmas)}")
            if name == "act_encode_kernel" and (
                    "div.rn.f32" not in ptx or "div.full.f32" in ptx or "div.approx" in ptx):
                failures.append(f"{what}: divisions are not IEEE")
            print(f"{what}: shared {shared} B, {sorted(m for m in mmas if 's8' in m)}")
    print("\n".join(failures) or f"compiled {len(jobs)} variants")

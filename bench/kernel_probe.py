"""Speed probe for the integer backend (not a test).

    python bench/kernel_probe.py [--threads 2] [--m 2048] [--k 768] [--n 3072] [--reps 10] [--clock wall|cpu]
    python bench/kernel_probe.py --device cuda --m 8192 --k 1152 --n 4608   # DiT-XL/2's fc1 at batch 32

Times one (M, K) x (K, N) linear: fp32 / bf16 F.linear, raw torch._int_mm (B in both layouts:
a row-major (K, N) tensor, and the transpose of a contiguous (N, K) one, the weight's own layout and
cuBLASLt's preferred column-major B), IntLinear
W8A8 (per channel and grouped) and W4A8 (group 64/128) on the fused CPU kernel and on the
torch kernel against QuantLinear's fake forward, plus the torch weight-only int kernels that
exist on CPU. With --device cuda the integer layers run the Triton kernels (and the torch-op path
beside them), every case synchronized.
Cases are timed round-robin (one run of each per round, `reps` rounds after a warm-up)
so that load changes on a shared machine hit all of them alike; min and median in ms.
"""
import argparse
import time

from ditas import threads  # first: sets OpenMP's wait policy, read when torch loads
import torch
import torch.nn.functional as F
from quant.nn.int_linear import IntLinear
from quant.kernels.ops_torch import quantize_act_int8
from quant.nn.qlinear import QuantLinear
from quant.method.quantizer import quantize_weight
from quant.quant_config import ActQuantConfig, WeightQuantConfig


def run_round_robin(cases, reps, clock=time.perf_counter):
    """cases: [(name, fn)] -> {name: sorted list of seconds}."""
    for _, f in cases:
        f()
    times = {name: [] for name, _ in cases}
    for _ in range(reps):
        for name, f in cases:
            t0 = clock()
            f()
            times[name].append(clock() - t0)
    return {name: sorted(ts) for name, ts in times.items()}


def int_mm_layouts(m, k, n, device="cpu", seed=0):
    """{label: fn} of torch._int_mm on one int8 (M, K) x (K, N) product with B in both layouts: a row-major
    (K, N) tensor, and the transpose of a contiguous (N, K) tensor (column-major B, the layout of an
    nn.Linear weight and cuBLASLt's preferred one for int8). Both compute the same product."""
    g = torch.Generator(device=device).manual_seed(seed)
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, device=device, generator=g)
    b_kn = torch.randint(-128, 128, (k, n), dtype=torch.int8, device=device, generator=g)
    b_nk = b_kn.t().contiguous()
    return {"torch._int_mm, B row-major (K, N)": lambda: torch._int_mm(a, b_kn),
            "torch._int_mm, B column-major ((N, K).t())": lambda: torch._int_mm(a, b_nk.t())}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--m", type=int, default=2048)
    ap.add_argument("--k", type=int, default=768)
    ap.add_argument("--n", type=int, default=3072)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--granularity", default="token")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: process CPU time (robust to time slicing on a shared box; use with --threads 1)")
    ap.add_argument("--weight-only", action="store_true", help="also time torch's weight-only int kernels (slow)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the layer runs")
    args = ap.parse_args()
    threads.set_threads(args.threads)
    torch.manual_seed(0)
    m, k, n = args.m, args.k, args.n
    dev = args.device
    x = torch.randn(m, k, device=dev)
    w = torch.randn(n, k, device=dev) * 0.02
    bias = torch.randn(n, device=dev) * 0.01
    xb, wb, bb = x.bfloat16(), w.bfloat16(), bias.bfloat16()
    cases = []

    def row(name, f):
        cases.append((name, f if dev == "cpu" else (lambda f=f: (f(), torch.cuda.synchronize()))))

    print(f"M={m} K={k} N={n} threads={torch.get_num_threads()} rank={args.rank} act={args.granularity} "
          f"clock={args.clock} torch {torch.__version__} cpu {torch.backends.cpu.get_cpu_capability()}")
    with torch.no_grad():
        row("fp32 F.linear", lambda: F.linear(x, w, bias))
        row("bf16 F.linear (nn.Linear in bf16)", lambda: F.linear(xb, wb, bb))
        if args.rank:
            lb, rb = torch.randn(n, args.rank, device=dev).bfloat16(), torch.randn(args.rank, k, device=dev).bfloat16()
            row(f"bf16 F.linear + bf16 LoRA r{args.rank}",
                lambda: F.linear(xb, wb, bb) + F.linear(F.linear(xb, rb), lb))
        for label, f in int_mm_layouts(m, k, n, dev).items():
            row(f"{label} (GEMM only)", f)
        acfg = ActQuantConfig(8, args.granularity)
        row("act quant (quantize_act_int8)", lambda: quantize_act_int8(x, acfg, m))
        for bits, g in ((8, None), (8, 128), (4, 128), (4, 64)):
            qw = quantize_weight(w, WeightQuantConfig(bits=bits, group_size=g))
            r = args.rank
            lora = (torch.randn(n, r, device=dev) * 1e-3, torch.randn(r, k, device=dev) * 1e-2) if r else (None, None)
            ql = QuantLinear(qw, bias, *lora, act_cfg=acfg)
            il = IntLinear.from_quantlinear(ql)
            tag = f"W{bits}A8 g{g or 'chan'} r{r}"
            row(f"QuantLinear fake {tag}", lambda ql=ql: ql(x))
            row(f"IntLinear {tag} ({il.runs})", lambda il=il: il(x))
            if il.runs != "torch":
                it = IntLinear.from_quantlinear(ql, "torch")
                row(f"IntLinear {tag} (torch)", lambda it=it: it(x))
            if r:
                ql0 = QuantLinear(qw, bias, act_cfg=acfg)
                il0 = IntLinear.from_quantlinear(ql0)
                row(f"IntLinear W{bits}A8 g{g or 'chan'} r0", lambda il0=il0: il0(x))
        if args.weight_only and dev == "cpu":
            w8 = torch.randint(-128, 128, (n, k), dtype=torch.int8)
            s8 = torch.rand(n)
            row("_weight_int8pack_mm bf16 (weight-only)", lambda: torch._weight_int8pack_mm(xb, w8, s8.bfloat16()))
            packed = torch._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (n, k), dtype=torch.int32), 1)
            sz = torch.rand(k // 128, n, 2).bfloat16()
            row("_weight_int4pack_mm_for_cpu bf16 g128", lambda: torch._weight_int4pack_mm_for_cpu(xb, packed, 128, sz))
    print(f"timing {len(cases)} cases x {args.reps} rounds ...", flush=True)
    with torch.no_grad():
        times = run_round_robin(cases, args.reps, time.process_time if args.clock == "cpu" else time.perf_counter)
    base = times["bf16 F.linear (nn.Linear in bf16)"][0]
    print(f"{'case':56s} {'min ms':>8s} {'median':>8s} {'vs bf16 (min)':>14s}")
    for name, _ in cases:
        ts = times[name]
        print(f"{name:56s} {ts[0] * 1e3:8.2f} {ts[len(ts) // 2] * 1e3:8.2f} {base / ts[0]:13.2f}x")


if __name__ == "__main__":
    main()

"""Question: what does the online Hadamard rotation of fc2's input (--hadamard, quant/method/rotation.py) cost per
fc2 call at DiT-XL/2's shape (4608 -> 1152, block 128), against the fc2 call itself?
Answer (bench/results/w4a4.md, 1 thread, shared 2-core CPU): the batched 128 x 128 block product takes 11.9 ms per
512-row call, about half of the W4A8 fc2 call (23.1 ms); the torch-ops butterfly 30.0 ms. Not timed on a GPU.

    python bench/studies/hadamard_cost.py --threads 1 --rows 512

Rows are tokens of one call (DiT-XL/2 at 256x256: 256 tokens per sample, x2 with CFG). Timed: quant.method.rotation.fwht
(log2(128) = 7 butterfly stages in torch ops), the same rotation as one batched product with the dense 128 x 128
block, and fc2 as a float32 F.linear and as the W4A8 integer layer (IntLinear, the kernel chosen by "auto").
Median of --repeats after a warm-up; prints a markdown table.
"""
import argparse
import statistics
import time

from ditas import threads  # before torch
import torch
import torch.nn.functional as F

from quant.method.quantizer import quantize_weight
from quant.method.rotation import block_rotate, block_size, fwht, hadamard_matrix
from quant.nn.int_linear import IntLinear
from quant.nn.qlinear import QuantLinear
from quant.quant_config import ActQuantConfig, WeightQuantConfig


def timed(fn, repeats):
    fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--inp", type=int, default=4608)
    p.add_argument("--out", type=int, default=1152)
    p.add_argument("--repeats", type=int, default=20)
    threads.add_threads_arg(p)
    args = p.parse_args(argv)
    threads.set_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.rows, args.inp, generator=g)
    w = torch.randn(args.out, args.inp, generator=g) * 0.02
    b = block_size(args.inp)
    hb = hadamard_matrix(b)
    ql = QuantLinear(quantize_weight(w, WeightQuantConfig(bits=4, group_size=128)), None,
                     act_cfg=ActQuantConfig(8, "token"))
    il = IntLinear.from_quantlinear(ql)
    rows = [("fwht, 7 butterfly stages (torch ops)", lambda: fwht(x, b)),
            ("block_rotate: one batched product with the dense 128x128 block (what runs)",
             lambda: block_rotate(x, hb)),
            ("fc2 float32 F.linear", lambda: F.linear(x, w)),
            (f"fc2 W4A8 IntLinear ({il.runs})", lambda: il(x))]
    print(f"| {args.rows} rows x {args.inp} -> {args.out}, block {b}, {torch.get_num_threads()} thread(s) | ms |")
    print("|---|---|")
    for name, fn in rows:
        print(f"| {name} | {1e3 * timed(fn, args.repeats):.3f} |")
    print(f"\nadditions per token: {args.inp} x log2({b}) = {args.inp * (b.bit_length() - 1)}; fc2 multiply-adds per "
          f"token: {args.inp * args.out}")


if __name__ == "__main__":
    main()

"""Question: what does --bias-correction's extra pass (quant/calibration/bias.py) cost at DiT-XL/2's shapes, in time
against the FP calibration loop it rides on, and in memory?
Answer: see docs/METHOD.md §15 (numbers from this script, the command there): the pass is one FP loop plus every
quantized layer's forward on the same input; it holds the QuantLinears being measured (the quantized model's
size, built once more at the end) beside the FP model.

    python bench/studies/bias_correction_cost.py --threads 1 --model DiT-XL/2 --latent 4 --steps 5

A random DiT (bench/scale_memory.py random_model: adaLN not zero) on a latent x latent input (DiT-XL/2 at --latent 4:
4 tokens, so the weights dominate), 16 labels x 2 rows (guidance), --steps DDPM steps. Every quantizable layer is
quantized W4A8 at alpha 0.5 with LoRA rank 32 (1 alternating iteration: the fit's quality does not change the pass's
cost). Timed: the FP loop alone, then mean_output_errors (the FP loop with every layer's quantized forward hooked
in), alternating, median of --repeats. Memory: the bytes of the tensors each part holds (exact, from shapes).
"""
import argparse
import statistics
import time

from ditas import threads  # before torch
import torch

from bench.scale_memory import random_model
from quant.calibration.bias import mean_output_errors
from quant.calibration.driver import collect_tas
from quant.calibration.loop import fp_calibration_loop
from quant.method.layers import quantizable_layers
from quant.quant_config import QuantConfig
from quant.search.candidates import quantize_linear


def nbytes(module):
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="DiT-XL/2")
    p.add_argument("--latent", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--labels", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    threads.add_threads_arg(p)
    args = p.parse_args(argv)
    threads.set_threads(args.threads)
    torch.set_grad_enabled(False)

    model = random_model(args.model, args.latent, seed=0)
    loop = fp_calibration_loop(model, [i % 1000 for i in range(args.labels)], seed=1, steps=args.steps)
    layers = quantizable_layers(model)
    cfg = QuantConfig(alpha=0.5)
    t0 = time.perf_counter()
    absmax = collect_tas(layers, loop)
    quantized = {n: quantize_linear(lin, 0.5, absmax[n], cfg.weight_cfg(), cfg.act_cfg(), cfg.lora_rank, 1)
                 for n, lin in layers.items()}
    print(f"# {args.model}, {args.latent}x{args.latent} latent, {args.labels} labels x 2, {args.steps} steps, "
          f"{torch.get_num_threads()} thread(s); {len(layers)} layers quantized in {time.perf_counter() - t0:.0f} s")

    fp_s, pass_s = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        loop()
        fp_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        mean_output_errors(layers, quantized, loop)
        pass_s.append(time.perf_counter() - t0)
    fp, bc = statistics.median(fp_s), statistics.median(pass_s)
    gib = 2 ** 30
    print("| what | value |\n|---|---|")
    print(f"| FP loop (s, median of {args.repeats}) | {fp:.2f} |")
    print(f"| bias-correction pass (s) | {bc:.2f} ({bc / fp:.2f}x the FP loop) |")
    print(f"| FP model (GiB) | {nbytes(model) / gib:.2f} |")
    print(f"| FP quantizable layers (GiB) | {sum(nbytes(l) for l in layers.values()) / gib:.2f} |")
    print(f"| QuantLinears held by the pass (GiB) | {sum(nbytes(q) for q in quantized.values()) / gib:.2f} |")
    print(f"| mean error sums (MiB, float64) | "
          f"{sum(l.out_features for l in layers.values()) * 8 / 2 ** 20:.2f} |")


if __name__ == "__main__":
    main()

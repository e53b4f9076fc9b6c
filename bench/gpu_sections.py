"""The sections of bench/gpu.py: each takes the run's context (prof: gpu.Profile, work: a folder, threads) and
returns {"columns", "rows", "notes", "data"} for the report. Timings: CUDA events on a GPU (wall clock on CPU),
the median of prof.reps calls after a warm-up call."""
import copy
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from bench.common import ROOT
from bench.measure import model_bytes
from bench.kernel_probe import int_mm_layouts
from bench.scale_memory import CALIB_ROWS, meta_model, project, random_model
from bundled.digits import BUNDLED_FLAGS
from config import DEFAULTS
from quant.calibration.driver import quantize_dit
from quant.quant_config import QuantConfig
from quant.method.fold import fold_smoothing
from quant.method.layers import BLOCK_LAYERS, quantizable_layers
from quant.kernels.ops_torch import batch_of
from quant.nn.qlinear import QuantLinear
from quant.method.quantizer import pack_int4, quantize_act, quantize_weight
from quant.quant_config import ActQuantConfig, WeightQuantConfig

MB = 1e6
TOL_FAKE, TOL_TORCH = 1e-4, 1e-5  # relative L2 error of Triton's output against the fake / torch-op path


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, reps, device):
    """Median ms of fn() over reps calls after a warm-up call (CUDA events on a GPU)."""
    fn()
    sync(device)
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_bytes(fn, device):
    """(rise of CUDA's peak allocation during fn(), the peak itself); (None, None) on CPU."""
    if device != "cuda":
        return None, None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before, torch.cuda.max_memory_allocated()


def first_line(text, last=False):
    lines = [line for line in str(text).strip().splitlines() if line.strip()] or [""]
    return lines[-1 if last else 0]


def shown(cmd):
    """A command as a user types it in the repository."""
    return " ".join(["python", *cmd[1:]]).replace(ROOT + os.sep, "")


def rel(y, ref):
    return float((y.double() - ref.double()).norm() / ref.double().norm())


def layer_shapes(prof):
    """{layer: (out, in)} of one block of the profile's model (the four quantized linears)."""
    block = meta_model(prof.model, prof.image_size // 8).blocks[0]
    return {n: tuple(block.get_submodule(n).weight.shape) for n in BLOCK_LAYERS}


def tokens(prof):
    return (prof.image_size // 8 // int(prof.model.rsplit("/", 1)[1])) ** 2


def random_qlinear(n, k, bits, group, device, seed, rank=32):
    """A QuantLinear of QuantDiT's form (ditas, row ranges, LoRA, smoothing, bias) with an outlier column."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[:, 3] *= 10
    qw = quantize_weight(w, WeightQuantConfig(bits=bits, group_size=group))
    return QuantLinear(qw, torch.randn(n, generator=g), torch.randn(n, rank, generator=g) * 0.01,
                       torch.randn(rank, k, generator=g) * 0.1, torch.rand(k, generator=g) + 0.5,
                       ActQuantConfig(8, "row")).to(device)


def random_input(shape, device, seed):
    """Activations with an outlier channel (the integer tests' kind)."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    x[..., 7] *= 20
    return x.to(device)


def run_logged(cmd, log, env=None):
    """Run cmd in the repository, output to log; (exit code, output). Killed with its process group if this
    process is interrupted (a section's time cap)."""
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                env=dict(os.environ, **(env or {})))
        try:
            code = proc.wait()
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    with open(log) as f:
        return code, f.read()


# ---------------------------------------------------------------- the sections

def section_check(ctx):
    from quant.kernels import ops_triton as ot
    from quant.nn.int_linear import IntLinear
    prof, rows = ctx.prof, []
    for bits in (8, 4):
        for i, (name, (n, k)) in enumerate(layer_shapes(prof).items()):
            ql = random_qlinear(n, k, bits, prof.group, prof.device, seed=i)
            act = "gelu_tanh" if name == "mlp.fc1" else None
            tri, ref = (IntLinear.from_quantlinear(ql, kern, act) for kern in ("triton", "torch"))
            x = random_input((2, tokens(prof), k), prof.device, seed=100 + i)
            with torch.no_grad():
                fake = ql(x) if act is None else F.gelu(ql(x), approximate="tanh")
                y, y_torch = tri(x), ref(x)
                codes = ot.quantize_act(x.reshape(-1, k), 8, "ditas", "row", batch_of(x.shape, "row"), tri.smooth,
                                        prof.group)[0]
            want = quantize_act(x / tri.smooth, ql.act_cfg)[0].reshape(-1, k)
            same = bool(torch.equal((codes.to(torch.int16) + 128).to(torch.uint8), want))  # codes - 128, int8
            r_fake, r_torch = rel(y, fake), rel(y, y_torch)
            rows.append([f"W{bits}A8", name, f"{x.numel() // k}x{k}x{n}", "yes" if same else "NO", f"{r_fake:.2e}",
                         f"{r_torch:.2e}", "ok" if same and r_fake < TOL_FAKE and r_torch < TOL_TORCH else "FAIL"])
    return {"columns": ["weights", "layer", "M x K x N", "codes equal", "rel. error vs fake",
                        "rel. error vs torch-op int", "within tolerance"], "rows": rows,
            "notes": [f"Group {prof.group}, LoRA rank 32, smoothing, bias, per-row activation ranges, fc1 with its "
                      f"GELU epilogue; tolerances: < {TOL_FAKE:g} against fake, < {TOL_TORCH:g} against the torch-op "
                      "integer path (tests/test_ops_triton.py)."]}


def random_operands(n, k, bits, group, device, seed, rank=32):
    """Triton weight operands of random codes, scales, zero points, LoRA and bias."""
    from quant.kernels import ops_triton as ot
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2 ** bits, (n, k), generator=g).to(torch.uint8)
    zero = torch.randint(0, 2 ** bits, (n, k // group), generator=g).float()
    return ot.prepare((pack_int4(codes) if bits <= 4 else codes).to(device), bits,
                      (torch.rand(n, k // group, generator=g) * 1e-2 + 1e-3).to(device), zero.to(device),
                      (torch.randn(n, rank, generator=g) * 0.01).to(device),
                      (torch.randn(rank, k, generator=g) * 0.1).to(device), torch.randn(n, generator=g).to(device),
                      group)


def section_gemm(ctx):
    from quant.kernels import ops_triton as ot
    prof, m, rows, data = ctx.prof, ctx.prof.gemm_rows, [], {}
    bf = torch.bfloat16
    for i, (name, (n, k)) in enumerate(layer_shapes(prof).items()):
        xb = random_input((m, k), prof.device, seed=i).to(bf)
        wb, bb = (torch.randn(n, k) * 0.02).to(prof.device, bf), torch.randn(n).to(prof.device, bf)
        act = "gelu_tanh" if name == "mlp.fc1" else None
        cases = {"bf16 F.linear (cuBLAS)": lambda: F.linear(xb, wb, bb)}
        layouts = int_mm_layouts(m, k, n, prof.device)
        cases.update(layouts)
        cases["Triton activation pass"] = lambda: ot.quantize_act(xb, 8, "ditas", "row", 1, None, prof.group)
        for bits in (8, 4):
            ops = random_operands(n, k, bits, prof.group, prof.device, seed=i)
            qa = ot.quantize_act(xb, 8, "ditas", "row", 1, None, prof.group, ops.lora_R)
            cases[f"Triton GEMM W{bits}A8"] = lambda ops=ops, qa=qa: ot.gemm(*qa, ops, act, bf)
            cases[f"Triton linear W{bits}A8 (activation pass + GEMM)"] = (
                lambda ops=ops: ot.linear(xb, ops, "row", 8, "ditas", 1, None, act, bf))
        a, b = (f() for f in layouts.values())
        if not torch.equal(a, b):
            raise AssertionError(f"{name}: torch._int_mm gives other products for the two layouts of B")
        ms = {case: median_ms(f, prof.reps, prof.device) for case, f in cases.items()}
        data[name] = ms
        base = ms["bf16 F.linear (cuBLAS)"]
        for case, t in ms.items():
            tops = "" if case == "Triton activation pass" else f"{2 * m * k * n / t / 1e9:.1f}"
            rows.append([name, f"{m}x{k}x{n}", case, f"{t:.3f}", tops, f"{base / t:.2f}"])
    return {"columns": ["layer", "M x K x N", "case", "ms (median)", "TFLOP/s or TOP/s", "x bf16"], "rows": rows,
            "data": data,
            "notes": [f"M = {m} rows (batch 32 x 256 tokens on the GPU). bf16: x (M, K) and weight (N, K) with bias. "
                      "torch._int_mm: the int8 product alone, B as a row-major (K, N) tensor or as the transpose of "
                      "a contiguous (N, K) one (column-major, the weight's layout); both give equal products "
                      f"(checked). Triton: group {prof.group}, LoRA rank 32, bias, fc1's GELU epilogue, bf16 out, "
                      "the launch configuration quant/kernels/ops_triton.py picks; GEMM = gemm() on prepared codes, linear "
                      f"= quantize_act() + gemm(). Median of {prof.reps} after a warm-up call."]}


def int_model(fp, bits, group, inputs):
    """fp quantized with a fixed alpha 0.5 (one forward's ranges, LoRA rank 32 in one iteration), folded, on
    the Triton integer kernel, the rest in bf16 (sample_merge_TAS.py --backend int --dtype bf16)."""
    q = copy.deepcopy(fp)
    cfg = QuantConfig(weight_bit=bits, group_size=group, smoothing="fixed", lora_iters=1)
    quantize_dit(q, cfg, lambda: q(*inputs), progress=False)
    from quant.nn.int_linear import to_int_backend
    return to_int_backend(fold_smoothing(q), "triton").bfloat16()


def section_e2e(ctx):
    prof, dev, latent = ctx.prof, ctx.prof.device, ctx.prof.image_size // 8
    g = torch.Generator().manual_seed(1)
    fp = random_model(prof.model, latent, seed=0).to(dev)
    calib = (torch.randn(2, 4, latent, latent, generator=g).to(dev), torch.tensor([1, 500], device=dev),
             torch.tensor([3, 7], device=dev))
    models = {"bf16": copy.deepcopy(fp).bfloat16()}
    with torch.no_grad():
        for bits in (8, 4):
            models[f"int W{bits}A8"] = int_model(fp, bits, prof.group, calib)
    del fp
    weights = {v: (model_bytes(m), model_bytes(torch.nn.ModuleList(quantizable_layers(m).values())))
               for v, m in models.items()}
    rows, data = [], []
    for batch in prof.batches:
        x = torch.randn(batch, 4, latent, latent, generator=g).to(dev, torch.bfloat16)
        t, y = torch.randint(0, 1000, (batch,), generator=g).to(dev), torch.randint(0, 1000, (batch,)).to(dev)
        with torch.inference_mode():
            for v, m in models.items():
                ms = median_ms(lambda: m(x, t, y), prof.reps, dev)
                extra, peak = peak_bytes(lambda: m(x, t, y), dev)
                data.append({"batch": batch, "variant": v, "ms": ms, "weights_bytes": weights[v][0],
                             "linear_bytes": weights[v][1], "peak_extra_bytes": extra, "peak_bytes": peak})
    for r in data:
        base = next(b for b in data if b["batch"] == r["batch"] and b["variant"] == "bf16")
        r["vs_bf16"] = base["ms"] / r["ms"]
        mb = ["n/a" if r[key] is None else f"{r[key] / MB:.1f}"
              for key in ("weights_bytes", "linear_bytes", "peak_extra_bytes", "peak_bytes")]
        rows.append([r["batch"], r["variant"], f"{r['ms']:.2f}", f"{r['vs_bf16']:.2f}", *mb])
    return {"columns": ["batch", "variant", "ms / step", "x bf16", "weights MB", "quantized linears MB",
                        "peak extra MB", "peak MB"], "rows": rows, "data": data,
            "notes": [f"{prof.model}, random weights (adaLN and final layer N(0, 0.02)), {prof.image_size} px = "
                      f"{tokens(prof)} tokens. One step = one model forward at that batch (with CFG, a batch of "
                      "B/2 labels). int: QuantDiT's layer form (ditas, group "
                      f"{prof.group}, per-row activation ranges, LoRA rank 32) from a fixed alpha 0.5 and one "
                      "LoRA iteration (the speed does not depend on calibration), smoothing folded, Triton kernel, "
                      "everything else bf16. weights: every tensor the model keeps (Triton operands included, each "
                      "storage once); quantized linears: the 4 linears of every block. peak: CUDA's peak allocation "
                      f"during one forward. Median of {prof.reps} after a warm-up call."]}


def section_torchrun(ctx):
    prof, work = ctx.prof, ctx.work
    ckpt, samples = os.path.join(work, "bundled-W4A8"), os.path.join(work, "samples")
    shutil.rmtree(samples, ignore_errors=True)  # a rerun samples again (it would resume the finished .npz)
    quant = [sys.executable, "QuantDiT.py", *BUNDLED_FLAGS, "--weight-bit", "4", "--smoothing", "fixed",
             "--num-sampling-steps", "5", "--no-preview", "--out", ckpt, "--overwrite", "--device", prof.device,
             "--threads", str(ctx.threads)]
    code, out = run_logged(quant, ckpt + ".log")
    if code:
        raise RuntimeError(f"QuantDiT.py on the bundled model exited {code}: {first_line(out, last=True)}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           "sample_merge_TAS.py", "--path", ckpt, "--backend", "int", "--num-fid-samples", "16",
           "--per-proc-batch-size", "8", "--num-sampling-steps", "5", "--sample-dir", samples, "--overwrite",
           "--device", prof.device]
    t0 = time.perf_counter()
    code, out = run_logged(cmd, os.path.join(work, "torchrun.log"), env={"NCCL_DEBUG": "INFO"})
    wall = time.perf_counter() - t0
    found = sorted(f for f in os.listdir(samples) if f.endswith(".npz")) if os.path.isdir(samples) else []
    shape = None
    if found:
        import numpy as np
        with np.load(os.path.join(samples, found[0])) as f:
            shape = list(f["arr_0"].shape)
    if code or shape is None:
        raise RuntimeError(f"torchrun exited {code}, .npz {found or 'missing'}: {first_line(out, last=True)}")
    nccl = sum("NCCL INFO" in line for line in out.splitlines())
    group = ("nccl" if nccl else "none (no NCCL INFO line)") if prof.device == "cuda" else "not observed (CPU: gloo)"
    return {"columns": ["command", "exit", "wall s", ".npz shape", "process group", "NCCL INFO lines"],
            "rows": [[f"`{shown(cmd)}`", code, f"{wall:.1f}", str(shape), group,
                      nccl]], "data": {"exit": code, "wall_s": wall, "shape": shape, "nccl_lines": nccl},
            "notes": ["The bundled digits model quantized W4A8 (alpha 0.5, 5 steps; QuantDiT.py), sampled with the "
                      "integer backend. The process group (pipeline.init_distributed makes one under torchrun, one "
                      "process included) is seen in NCCL's own log (NCCL_DEBUG=INFO)."]}


def section_calib(ctx):
    prof, work, latent = ctx.prof, ctx.work, ctx.prof.image_size // 8
    path = os.path.join(work, f"{prof.model.replace('/', '-')}-{latent}x{latent}-seed0.pt")
    if not os.path.isfile(path):
        torch.save(random_model(prof.model, latent, seed=0).state_dict(), path + ".part")
        os.replace(path + ".part", path)
    out_dir = os.path.join(work, "calib")
    group = [] if prof.group == QuantConfig().group_size else ["--group-size", str(prof.group)]
    cmd = [sys.executable, "QuantDiT.py", "--model", prof.model, "--ckpt", path, "--image-size", str(prof.image_size),
           "--vae", "mse", "--no-preview", "--num-sampling-steps", str(prof.calib_steps), *group, "--out", out_dir,
           "--overwrite", "--device", prof.device, "--threads", str(ctx.threads)]
    t0 = time.perf_counter()
    code, out = run_logged(cmd, out_dir + ".log")
    wall = time.perf_counter() - t0
    if code:
        raise RuntimeError(f"QuantDiT.py exited {code}: {first_line(out, last=True)}")
    with open(os.path.join(out_dir, "report.json")) as f:
        report = json.load(f)
    cal = report["calibration"]
    proj = project(prof.model, QuantConfig(group_size=prof.group), prof.device, prof.image_size, latent,
                   prof.calib_steps, round(DEFAULTS.calib_memory_gb * 2 ** 30))
    measured = cal["peak_cuda_bytes"] if prof.device == "cuda" else cal["peak_rss_bytes"]
    gib = lambda b: f"{b / 2 ** 30:.2f}"  # noqa: E731
    return {"columns": ["wall s", "calibration s", "FP model GiB", "search state GiB", "activations GiB",
                        "projected peak GiB", "measured peak GiB", "measured / projected"],
            "rows": [[f"{wall:.1f}", f"{report['timings']['total_s']:.1f}",
                      *(gib(proj[key]) for key in ("model", "state", "activations", "projected")), gib(measured),
                      f"{measured / proj['projected']:.2f}"]],
            "data": {"wall_s": wall, "timings": report["timings"], "calibration": cal, "projection": proj,
                     "projected_bytes": proj["projected"], "measured_bytes": measured},
            "notes": [f"`{shown(cmd)}`: {prof.model} (random weights), "
                      f"{prof.image_size} px, {prof.calib_steps} steps, batch {CALIB_ROWS} rows, QuantDiT's defaults. "
                      "Projected (bench/scale.py's project, on this device): FP model + the largest layer group's "
                      "planned search state (quant/calibration/budget.py) + activations; measured: torch.cuda.max_memory_allocated "
                      "on a GPU, the process's peak RSS on CPU (the interpreter and libraries included)."]}


SECTIONS = {"check": section_check, "gemm": section_gemm, "e2e": section_e2e, "torchrun": section_torchrun,
            "calib": section_calib}

"""Small shared test utilities."""
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(*argv, cwd=ROOT, env=None, timeout=600):
    """Run a repository script with this interpreter; returns the CompletedProcess."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    full_env.update(env or {})
    return subprocess.run([sys.executable, *map(str, argv)], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def assert_user_error(proc, *fragments):
    """Exit 2, exactly one stderr line starting 'error:', no traceback, naming the fragments."""
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], err[-2000:])
    assert "Traceback" not in err, err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def call_main(module, *argv):
    """Run a script's build_parser() + main in-process, as its __main__ does: (exit code, stderr).

    Much faster than a subprocess for input-validation tests; the one-line contract is the same
    because both go through cli.run and cli.ArgumentParser.
    """
    import contextlib
    import io

    from ditas import cli
    err = io.StringIO()
    code = 0
    with contextlib.redirect_stderr(err):
        try:
            cli.run(module.main, module.build_parser().parse_args([str(a) for a in argv]))
        except SystemExit as e:
            code = e.code
    return code, err.getvalue()


def assert_one_line_error(code, stderr, *fragments):
    """The in-process twin of assert_user_error."""
    class Proc:
        returncode = code
        stdout = ""
    Proc.stderr = stderr
    assert_user_error(Proc, *fragments)


# ---------------------------------------------------------------------------- tiny models and data

def random_dit(seed=0, std=0.1):
    """DiT-XS/2 (8x8x3, 10 classes) with every parameter but pos_embed drawn N(0, std): adaLN-Zero starts at 0,
    so everything is randomized for quantization and folding to matter."""
    import torch
    from models import DiT_models
    torch.manual_seed(seed)
    model = DiT_models["DiT-XS/2"](input_size=8, in_channels=3, num_classes=10)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def calib_loop(model, steps, n):
    """One FP sampling loop of a 10-class model over n labels (seed 1, cfg 1.5, clipped): quantize_dit's `loop`."""
    from quant import fp_calibration_loop
    loop = fp_calibration_loop(model, [i % 10 for i in range(n)], seed=1, steps=steps, cfg_scale=1.5,
                               clip_denoised=True)
    return lambda: loop()  # a plain loop: no LoopShape, so the budget tests' sizes hold no per-step ranges


def search_problem(seed=0, steps=3, out=96, inp=64, batch=4, tokens=5, shift=0.0):
    """(weight, bias, per-step inputs) of one linear layer with outlier weight columns and activation channels."""
    import torch
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.05
    w[:, [2, 30]] *= 8.0
    b = torch.randn(out, generator=g) * 0.1
    xs = []
    for t in range(steps):
        x = torch.randn(batch, tokens, inp, generator=g) * (1 + 0.3 * t) + shift
        x[..., [7, 41, 50]] *= 40.0  # activation outlier channels
        xs.append(x)
    return w, b, xs


def int_layer(k, n, bits=8, group=None, gran="token", rank=0, smooth=False, bias=True, symmetric=False, a_bits=8,
              act_scheme="ditas", seed=0, wshift=0.0):
    """A QuantLinear for the integer-kernel tests: a channel with 10x the weights, optional LoRA, smoothing,
    bias; wshift moves the first rows far from 0 (4-bit zero points beyond the int8 offset range)."""
    import torch

    from quant.nn.qlinear import QuantLinear
    from quant.method.quantizer import quantize_weight
    from quant.quant_config import ActQuantConfig, WeightQuantConfig
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[:, 3] *= 10
    w[:4] += wshift
    qw = quantize_weight(w, WeightQuantConfig(bits=bits, group_size=group, symmetric=symmetric))
    L = torch.randn(n, rank, generator=g) * 0.01 if rank else None
    R = torch.randn(rank, k, generator=g) * 0.1 if rank else None
    s = torch.rand(k, generator=g) + 0.5 if smooth else None
    b = torch.randn(n, generator=g) if bias else None
    return QuantLinear(qw, b, L, R, s, ActQuantConfig(a_bits, gran, scheme=act_scheme))


def int_input(shape, seed=1, kind="outliers"):
    """Activations with an outlier channel; kind "gelu": codes crowd near the bottom of the range (zero
    point far from 128)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    x[..., 7] *= 20
    if kind == "gelu":
        x = torch.nn.functional.gelu(3 * x)
    return x


def free_port():
    """A TCP port free on 127.0.0.1 now (for a process group's rendezvous)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_gloo_workers(target, *args, world=2):
    """Spawn `world` processes running target(rank, port, queue, *args), which each put (rank, result) on the
    queue: {rank: result}."""
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=target, args=(r, port, queue, *args)) for r in range(world)]
    for p in procs:
        p.start()
    got = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(60)
    return got


class HostSyncs:
    """Counts the device-to-host scalar reads (aten::_local_scalar_dense: .item(), float(t), int(t), bool(t)) made
    inside a `with HostSyncs() as syncs:` block; each is a blocking host sync on CUDA. `.cpu()` / `.tolist()` of a
    CPU tensor are not dispatched and are not counted: keep them out of hot loops by review."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func is torch.ops.aten._local_scalar_dense.default:
                    counter.count += 1
                return func(*args, **(kwargs or {}))

        self.count, self._mode = 0, _Mode()

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


def quantize_blocks(model, bits, group, g, rank=4, iters=2, gran="row"):
    """Every block's qkv, proj, fc1 and fc2 as a QuantLinear (smoothing factors exp(N(0, 0.25)) drawn from the
    generator g, a LoRA fit of `rank` over `iters` iterations, 8-bit activations of granularity `gran`), the
    smoothing folded: a small quantized DiT without a calibration run. Returns the model, in eval mode."""
    from quant.method.fold import fold_smoothing
    from quant.method.lora import fit_lora
    from quant.nn.qlinear import QuantLinear
    from quant.method.quantizer import quantize_weight
    from quant.quant_config import ActQuantConfig, WeightQuantConfig
    wcfg, acfg = WeightQuantConfig(bits=bits, group_size=group), ActQuantConfig(8, gran)
    for block in model.blocks:
        for parent, attr in ((block.attn, "qkv"), (block.attn, "proj"), (block.mlp, "fc1"), (block.mlp, "fc2")):
            lin = getattr(parent, attr)
            s = torch.exp(torch.randn(lin.in_features, generator=g) * 0.5)
            fit = fit_lora(lin.weight.detach() * s, lambda w: quantize_weight(w, wcfg), rank=rank, iters=iters)
            setattr(parent, attr, QuantLinear(fit.qweight, lin.bias, fit.L, fit.R, smooth=s, act_cfg=acfg))
    return fold_smoothing(model.eval())

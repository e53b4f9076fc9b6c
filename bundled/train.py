"""A small-scale version of facebookresearch/DiT's train.py that makes the bundled model.

Trains a class-conditional DiT in pixel space on scikit-learn's handwritten digits
(real data that installs offline), with upstream's recipe: AdamW, EMA, label dropout for
classifier-free guidance, MSE + VB loss. Checkpoints are {model, ema, opt, args, step};
`--export` writes the EMA weights alone as safetensors (what assets/ ships).
"""
import argparse
import os
import time
from copy import deepcopy

from ditas import threads  # (before torch: sets OpenMP's wait policy, read when torch loads)
import torch
from bundled.digits import NUM_CLASSES, load_digits_tensors
from diffusion import create_diffusion
from models import DiT_models
from quant.io.files import atomic_path


def ema_decay(target, ema_steps):
    """EMA decay with warmup: (1 + n) / (10 + n) early on, so a short run's EMA is not dominated by the init."""
    return min(target, (1 + ema_steps) / (10 + ema_steps))


@torch.no_grad()
def update_ema(ema_model, model, decay=0.9999):
    """Step the EMA model towards the current model."""
    ema_params = dict(ema_model.named_parameters())
    for name, param in model.named_parameters():
        ema_params[name].mul_(decay).add_(param.data, alpha=1 - decay)


def save_atomic(obj, path):
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def export_ema(ema, path, dtype):
    from safetensors.torch import save_file
    tensors = {k: v.detach().to(dtype).contiguous() for k, v in ema.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp)


def main(args):
    torch.manual_seed(args.seed)
    threads.set_threads(args.threads)
    os.makedirs(args.results_dir, exist_ok=True)

    images, labels = load_digits_tensors(args.image_size)
    model = DiT_models[args.model](input_size=args.image_size, in_channels=3, num_classes=NUM_CLASSES)
    ema = deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0)
    diffusion = create_diffusion(timestep_respacing="")
    step = ema_start = 0
    ckpt_path = os.path.join(args.results_dir, "last.pt")
    if args.resume and os.path.exists(ckpt_path):
        ckpt = torch.load(ckpt_path, weights_only=True)
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        step = ckpt["step"]
        ema_start = ckpt.get("ema_start", 0)
        if args.reset_ema:
            ema.load_state_dict(model.state_dict())
            ema_start = step
        torch.manual_seed(args.seed + step)
        print(f"resumed from {ckpt_path} at step {step}" + (" (EMA restarted from the model)" if args.reset_ema else ""))
    print(f"DiT parameters: {sum(p.numel() for p in model.parameters()):,}; {len(images)} training images")

    model.train()
    ema.eval()
    t0 = time.time()
    running = 0.0
    while step < args.steps:
        idx = torch.randint(0, len(images), (args.batch_size,))
        x, y = images[idx], labels[idx]
        t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = diffusion.training_losses(model, x, t, dict(y=y))["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        update_ema(ema, model, ema_decay(args.ema_decay, step - ema_start))
        step += 1
        running += loss.item()
        if step % args.log_every == 0:
            elapsed = time.time() - t0
            print(f"step {step:6d}  loss {running / args.log_every:.4f}  {elapsed:.0f}s elapsed", flush=True)
            running = 0.0
        if step % args.ckpt_every == 0 or step == args.steps:
            save_atomic({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                         "args": vars(args), "step": step, "ema_start": ema_start}, ckpt_path)
    if args.export:
        export_ema(ema, args.export, torch.float16 if args.export_fp16 else torch.float32)
        print(f"wrote EMA weights to {args.export}")
    print(f"done: {step} steps in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=str, choices=list(DiT_models.keys()), default="DiT-T/2")
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--results-dir", type=str, default="results/train")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--seed", type=int, default=0)
    threads.add_threads_arg(parser)
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                        help="bf16 autocast (2-3x faster on CPU)")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--ckpt-every", type=int, default=250)
    parser.add_argument("--resume", action="store_true", help="continue from RESULTS_DIR/last.pt")
    parser.add_argument("--reset-ema", action="store_true", help="with --resume: restart the EMA from the model")
    parser.add_argument("--export", type=str, default="", help="write the final EMA weights here (.safetensors)")
    parser.add_argument("--export-fp16", action="store_true", help="store the exported weights in fp16")
    main(parser.parse_args())

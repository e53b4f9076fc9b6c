"""Sample many images for FID from a full-precision or quantized DiT, over torchrun DDP, into one ADM .npz.

    python sample_merge_TAS.py --model DiT-T/2 --image-size 16 --num-classes 10 --vae none \
        --ckpt assets/dit_t2_digits16.safetensors --num-fid-samples 1000 --num-sampling-steps 50
    torchrun --nproc_per_node=2 sample_merge_TAS.py --path results/DiT-T-2-16-W4A8-ditas --num-fid-samples 10000 \
        --num-sampling-steps 50

Without --path the full-precision model (--ckpt) is sampled; with --path a quantized checkpoint
directory is loaded (quant.io.checkpoint.load_quantized) and its smoothing factors are folded
(quant.method.fold.fold_smoothing) before sampling.

Determinism. Sample i's label, x_T and every step's noise come from a generator seeded by
(--global-seed, i) (diffusion/sampling.py sample_inputs). The N samples are cut into shards of
--per-proc-batch-size consecutive indices (the last one may be short); shard k is one batch and
goes to rank k % world_size. A shard's content therefore does not depend on the world size, and
the .npz is byte-identical for any number of processes at the same --per-proc-batch-size (on the
same hardware and thread settings).

Files, in --sample-dir (ditas/shards.py): <name>.npz (arr_0: uint8 (N, H, W, 3), ADM's pixel conversion
pipeline.to_uint8); <name>.shards/ while sampling; <name>/*.png with --save-png. Every file is written
atomically, so a killed run leaves only complete shards; rerunning the same command samples only the
missing (or unreadable) ones, and a completed run is a no-op that reports the .npz path. Shards made
under another fingerprint (weights, quantization config, model flags, cfg, steps, seed, batch size,
device, --dtype, the integer kernels, TF32 on GPUs) are discarded.
"""
import hashlib
import json
import os

from ditas import threads  # before torch: sets OpenMP's wait policy, read when torch loads
import torch
from tqdm import tqdm

from ditas.cli import (ArgumentParser, UserError, add_backend_args, add_device_arg, add_dtype_arg, add_model_args,
                       add_tf32_arg, check_backend_args, check_common_args, check_seed, check_writable, latent_shape,
                       pick_device, resolve_model_args, run)
from ditas.pipeline import (barrier, build_model, decode, init_distributed, load_vae, on_every_rank, rank, sampling_model,
                            to_uint8, world_size)
from diffusion.sampling import make_sampler, sample_inputs
from ditas.shards import ShardStore, npz_chunks, npz_shape
from quant.method import fold
from quant.nn.inference import load_checkpoint
from quant.nn.int_linear import IntLinear

# upstream sample_ddp.py's defaults for the flags a quantized checkpoint may supply instead
MODEL_DEFAULTS = {"model": "DiT-XL/2", "image_size": 256, "num_classes": 1000, "vae": "ema"}
STATE_VERSION = 2


def _check_args(args):
    check_backend_args(args)
    if args.num_fid_samples <= 0:
        raise UserError(f"--num-fid-samples must be positive, got {args.num_fid_samples}")
    if args.per_proc_batch_size <= 0:
        raise UserError(f"--per-proc-batch-size must be positive, got {args.per_proc_batch_size}")
    check_seed(args.global_seed, "--global-seed")
    check_writable(args.sample_dir, "--sample-dir", kind="dir")


def _check_npz(path, n, overwrite):
    """An existing .npz of another size is replaced only with --overwrite (its name does not carry N)."""
    found = npz_shape(path)
    if found is not None and found[0][0] != n and not overwrite:
        raise UserError(f"{path} holds {found[0][0]} samples, not --num-fid-samples {n}: pass --overwrite to "
                        f"replace it, or choose another --sample-dir")


def output_name(args, meta):
    """<model>-size-<px>-vae-<vae>-cfg-<cfg>-seed-<seed>-steps-<steps>-<fp | W?A?-scheme>."""
    vae = os.path.basename(os.path.normpath(args.vae)) if os.path.isdir(args.vae) else args.vae
    name = (f"{args.model.replace('/', '-')}-size-{args.image_size}-vae-{vae}-cfg-{args.cfg_scale}"
            f"-seed-{args.global_seed}-steps-{args.num_sampling_steps}")
    dtype = "" if args.dtype == "fp32" else f"-{args.dtype}"
    if meta is None:
        return name + "-fp" + dtype
    act = meta["act_bit"]
    name += f"-W{meta['weight_bit']}A{act if act is not None else 'fp'}-{meta['scheme']}"
    return name + ("-int" if args.backend == "int" else "") + dtype


def fingerprint(model, args, meta, device):
    """Hash of everything a shard's bytes depend on (not the world size, not N): the settings, the kernels
    the integer layers run, and the model's state."""
    h = hashlib.sha256()
    settings = {
        "version": STATE_VERSION, "model": args.model, "image_size": args.image_size,
        "num_classes": args.num_classes, "vae": args.vae, "cfg_scale": args.cfg_scale,
        "steps": args.num_sampling_steps, "seed": args.global_seed, "batch": args.per_proc_batch_size,
        "device": device.type, "quant": meta, "dtype": args.dtype,
        "kernels": sorted(m.runs for m in model.modules() if isinstance(m, IntLinear)),
    }
    if device.type == "cuda":
        settings.update(tf32=args.tf32, gpu=torch.cuda.get_device_name(device))
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for key, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def main(args):
    with torch.no_grad():
        return on_every_rank(_main, args)


def _main(args):
    # Setup: check the inputs, then DDP
    threads.set_threads(args.threads)
    _check_args(args)
    device_kind = pick_device(args.device)
    meta = resolve_model_args(args, MODEL_DEFAULTS)
    check_common_args(args)
    channels, size = latent_shape(args)
    name = output_name(args, meta)
    _check_npz(os.path.join(args.sample_dir, f"{name}.npz"), args.num_fid_samples, args.overwrite)
    vae = load_vae(args.vae, "cpu")  # before the model: a missing VAE is found first

    # Load the model: FP from --ckpt, or the quantized checkpoint with its smoothing factors folded
    # (qkv and fc1 into adaLN's shift/scale, proj into the V rows of qkv, fc2 divided on the fly)
    if meta is None:
        model = build_model(args)
    else:
        model, loaded_meta = load_checkpoint(args.path)
        meta.update(loaded_meta or {})
        fold.fold_smoothing(model)
    device = init_distributed(device_kind)
    model = sampling_model(model, args, device, meta is not None)  # on the device, then (int) its operands
    rank_, world = rank(), world_size()

    # The shard store: shard k (a batch of consecutive indices) goes to rank k % world
    n, batch = args.num_fid_samples, args.per_proc_batch_size
    store = ShardStore(args.sample_dir, name, n, batch, (args.image_size, args.image_size, 3))
    fp = fingerprint(model, args, meta, device)
    if rank_ == 0:
        store.prepare(fp)
    barrier()
    saved = f"Saved .npz file to {store.npz_path} [shape=({n}, {args.image_size}, {args.image_size}, 3)]"
    if store.complete():  # every rank sees the same files; only the npz header is read
        if rank_ == 0:
            if args.save_png:  # only the PNGs are missing
                for start, arr in npz_chunks(store.npz_path, batch):
                    store.save_pngs(start, arr)
            else:
                print(f"{store.npz_path} is already complete ({n} samples); nothing to do")
            print(saved)
        return store.npz_path

    # Sample this rank's missing shards
    vae = None if vae is None else vae.to(device)
    sample = make_sampler(model, args.num_sampling_steps, args.cfg_scale, clip_denoised=args.vae == "none",
                          dtype=args.dtype)
    if rank_ == 0:
        kind = f"quantized ({os.path.basename(os.path.normpath(args.path))})" if meta is not None else "full precision"
        print(f"sampling {n} images ({args.model}, {kind}) on {world} process(es), {len(store.starts)} shards of "
              f"<= {batch}: {store.shard_dir}", flush=True)
    made = 0
    mine = store.starts[rank_::world]
    for start in tqdm(mine, desc=f"sampling shards of {batch} (rank {rank_} of {world})", unit="shard",
                      disable=rank_ != 0):
        arr = store.read(start)
        if arr is None:  # missing, or left corrupt/mismatched: (re)sample it
            gens, y, z = sample_inputs(args.global_seed, range(start, start + store.count(start)), args.num_classes,
                                       (channels, size, size))
            arr = to_uint8(decode(vae, sample(z, y, gens))).cpu().numpy()
            if args.save_png:  # PNGs first: a present shard implies its PNGs exist
                store.save_pngs(start, arr)
            store.write(start, arr)
            made += 1
        elif args.save_png:
            store.save_pngs(start, arr)

    # Rank 0 merges the shards into the .npz
    barrier()
    if rank_ == 0:
        store.merge(fp, keep_shards=args.keep_shards)
        print(f"{saved} ({made} of {len(store.starts)} shards sampled by rank 0)")
    return store.npz_path


def build_parser():
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(parser, **MODEL_DEFAULTS, cfg_scale=1.5, steps=250, from_path=True)
    parser.add_argument("--sample-dir", type=str, default="samples", help="where the .npz (and its shards) go")
    parser.add_argument("--per-proc-batch-size", type=int, default=32,
                        help="samples per forward batch and per shard (the .npz does not depend on the process count)")
    parser.add_argument("--num-fid-samples", type=int, default=50_000, help="samples in the .npz (N)")
    parser.add_argument("--global-seed", type=int, default=0,
                        help="sample i's label and noise depend on (global seed, i) only; any integer in [0, 2^63 - 1]")
    add_tf32_arg(parser, from_path=True)
    parser.add_argument("--path", type=str, default=None, help="a quantized checkpoint directory (QuantDiT.py)")
    parser.add_argument("--weight-bit", type=int, default=None, help="optional check against the checkpoint")
    parser.add_argument("--act-bit", type=int, default=None, help="optional check against the checkpoint")
    add_backend_args(parser)
    add_dtype_arg(parser)
    parser.add_argument("--save-png", action="store_true", help="also write one PNG per sample")
    parser.add_argument("--keep-shards", action="store_true", help="keep the shard files after writing the .npz")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing .npz of the same name that holds another number of samples")
    add_device_arg(parser)
    threads.add_threads_arg(parser)
    return parser


if __name__ == "__main__":
    run(main, build_parser().parse_args())

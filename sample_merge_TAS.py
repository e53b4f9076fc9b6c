"""Sample many images for FID from a full-precision or quantized DiT, over torchrun DDP, into one ADM .npz.

    python sample_merge_TAS.py --model DiT-T/2 --image-size 16 --num-classes 10 --vae none \
        --ckpt assets/dit_t2_digits16.safetensors --num-fid-samples 1000 --num-sampling-steps 50
    torchrun --nproc_per_node=2 sample_merge_TAS.py --path results/DiT-T-2-16-W4A8-ditas --num-fid-samples 10000 \
        --num-sampling-steps 50

Without --path the full-precision model (--ckpt) is sampled; with --path a quantized checkpoint
directory is loaded (quant.checkpoint.load_quantized) and its smoothing factors are folded
(quant.fold.fold_smoothing) before sampling.

Determinism. Sample i's label, x_T and every step's noise come from a generator seeded by
(--global-seed, i) (pipeline.sample_inputs). The N samples are cut into shards of
--per-proc-batch-size consecutive indices (the last one may be short); shard k is one batch and
goes to rank k % world_size. A shard's content therefore does not depend on the world size, and
the .npz is byte-identical for any number of processes at the same --per-proc-batch-size (on the
same hardware and thread settings).

Files, in --sample-dir:
    <name>.npz            arr_0: uint8 (N, H, W, 3), ADM's pixel conversion (digits.to_uint8)
    <name>.shards/        work in progress: shard-<first index>.npy (uint8 NHWC) + state.json
    <name>/000000.png ... only with --save-png (one PNG per sample, upstream's layout)
Every file is written under a temporary name and renamed into place, so a killed run leaves only
complete shards; rerunning the same command samples only the missing (or unreadable) ones. Once
the .npz is written the shard files are deleted (--keep-shards keeps them) and state.json records
the completed run, so a rerun is a no-op that reports the .npz path. state.json also holds a
fingerprint of everything a shard's bytes depend on (weights, quantization config, model flags,
cfg, steps, seed, batch size, device); shards made under another fingerprint are discarded.
"""
import argparse
import hashlib
import json
import os
import sys
import zipfile

import numpy as np
import torch
import torch.distributed as dist

from cli import ArgumentParser, UserError, run
from digits import to_uint8
from pipeline import add_dtype_arg, add_model_args, build_model, cast_for_sampling, check_common_args, \
    check_sampling_dtype, decode, latent_shape, load_vae, make_sampler, pick_device, resolve_model_args, sample_inputs

# upstream sample_ddp.py's defaults for the flags a quantized checkpoint may supply instead
MODEL_DEFAULTS = {"model": "DiT-XL/2", "image_size": 256, "num_classes": 1000, "vae": "ema"}
STATE_FILE = "state.json"
STATE_VERSION = 1


# ---------------------------------------------------------------------------- distributed

def _rank():
    """This process's rank (torchrun's RANK before the process group exists)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", "0"))


def _world():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _barrier():
    if _world() > 1:
        dist.barrier()


def _init_distributed(device_kind):
    """Init the process group when launched by torchrun with more than one process; returns the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and not dist.is_initialized():
        if device_kind == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
    return torch.device("cuda", local_rank) if device_kind == "cuda" else torch.device("cpu")


# ---------------------------------------------------------------------------- arguments and model

def _check_args(args):
    if args.backend == "int" and not args.path:
        raise UserError("--backend int needs a quantized checkpoint (--path); the FP model has no integer form")
    check_sampling_dtype(args.dtype, bool(args.path), args.backend)
    if args.num_fid_samples <= 0:
        raise UserError(f"--num-fid-samples must be positive, got {args.num_fid_samples}")
    if args.per_proc_batch_size <= 0:
        raise UserError(f"--per-proc-batch-size must be positive, got {args.per_proc_batch_size}")


def _check_writable(directory):
    """Create the sample dir and write/remove a probe file: fail before any sampling."""
    probe = os.path.join(directory, f".write-probe-{os.getpid()}-{_rank()}")
    try:
        os.makedirs(directory, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"ok")
        os.remove(probe)
    except OSError as e:
        raise UserError(f"--sample-dir {directory} is not writable ({type(e).__name__}: {e.strerror or e})") from None


def _load_model(args, meta):
    """(model on CPU in eval mode, quantized?)."""
    if meta is None:
        return build_model(args), False
    from quant.inference import load_for_sampling
    try:
        model, loaded_meta = load_for_sampling(args.path, args.backend, device="cpu")
    except UserError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(f"cannot load the quantized checkpoint {args.path} ({type(e).__name__}: {first})") from None
    meta.update(loaded_meta or {})
    return model, True


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
    """Hash of everything a shard's bytes depend on (not the world size, not N)."""
    h = hashlib.sha256()
    settings = {
        "version": STATE_VERSION, "model": args.model, "image_size": args.image_size,
        "num_classes": args.num_classes, "vae": args.vae, "cfg_scale": args.cfg_scale,
        "steps": args.num_sampling_steps, "seed": args.global_seed, "batch": args.per_proc_batch_size,
        "device": device.type, "quant": meta, "dtype": args.dtype,
    }
    if device.type == "cuda":
        settings.update(tf32=args.tf32, gpu=torch.cuda.get_device_name(device))
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for key, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ---------------------------------------------------------------------------- files

def _atomic_write(path, write):
    """write(file object) into a temporary sibling, then rename it to path."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_json(path, obj):
    _atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1, sort_keys=True).encode()))


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _shard_path(shard_dir, start):
    return os.path.join(shard_dir, f"shard-{start:08d}.npy")


def _read_shard(path, shape):
    """The shard's array if it is complete and has the expected shape/dtype, else None."""
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    return arr if arr.dtype == np.uint8 and arr.shape == shape else None


def _read_header(f):
    """(shape, fortran_order, dtype) of the .npy stream f, positioned at its start."""
    major, _ = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    return read(f)


def _npz_shape(path):
    """(shape, dtype) of arr_0 in an .npz without reading the array, or None."""
    try:
        with zipfile.ZipFile(path) as zf, zf.open("arr_0.npy") as f:
            shape, _, dtype = _read_header(f)
        return tuple(shape), np.dtype(dtype)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None


def write_npz(path, n, image_shape, shard_arrays):
    """Stream uint8 shards into <path> as arr_0 of shape (n, *image_shape), atomically.

    Written like np.savez (stored, zip64) but with a fixed timestamp, so identical samples give
    byte-identical files.
    """
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": (n, *image_shape)}

    def write(f):
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            info = zipfile.ZipInfo("arr_0.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_STORED
            info.external_attr = 0o600 << 16
            with zf.open(info, "w", force_zip64=True) as out:
                np.lib.format.write_array_header_1_0(out, header)
                count = 0
                for arr in shard_arrays:
                    out.write(np.ascontiguousarray(arr).tobytes())
                    count += len(arr)
                if count != n:
                    raise RuntimeError(f"shards hold {count} samples, expected {n}")

    _atomic_write(path, write)


def _save_pngs(png_dir, start, arr):
    from PIL import Image
    for j, img in enumerate(arr):
        path = os.path.join(png_dir, f"{start + j:06d}.png")
        if not os.path.exists(path):
            _atomic_write(path, lambda f, img=img: Image.fromarray(img).save(f, format="PNG"))


def _prepare_state(shard_dir, npz_path, fp, rank):
    """Rank 0: drop shards of another fingerprint and stale temporaries; then everyone reads the state."""
    if rank == 0:
        os.makedirs(shard_dir, exist_ok=True)
        npz_dir, npz_name = os.path.split(npz_path)
        for fname in os.listdir(npz_dir):  # a .npz write killed half-way
            if fname.startswith(npz_name + ".tmp-"):
                os.remove(os.path.join(npz_dir, fname))
        state = _read_json(os.path.join(shard_dir, STATE_FILE))
        stale = state is None or state.get("fingerprint") != fp
        for fname in os.listdir(shard_dir):
            if ".tmp-" in fname or (stale and fname.startswith("shard-")):
                os.remove(os.path.join(shard_dir, fname))
        if stale:
            if state is not None:
                print(f"{shard_dir}: existing shards were made with other settings; starting over", flush=True)
            _write_json(os.path.join(shard_dir, STATE_FILE), {"fingerprint": fp, "complete": None})
    _barrier()
    return _read_json(os.path.join(shard_dir, STATE_FILE))


# ---------------------------------------------------------------------------- main

def main(args):
    try:
        with torch.no_grad():
            return _main(args)
    except UserError:
        if _rank() != 0:  # every rank hits the same input error; rank 0 reports it
            sys.exit(2)
        raise
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _main(args):
    _check_args(args)
    device_kind = pick_device(args.device)
    meta = resolve_model_args(args, MODEL_DEFAULTS)
    check_common_args(args)
    channels, size = latent_shape(args)
    if device_kind == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    _check_writable(args.sample_dir)
    model, quantized = _load_model(args, meta)
    model = cast_for_sampling(model, args.dtype, quantized, args.backend)
    device = _init_distributed(device_kind)
    rank, world = _rank(), _world()

    name = output_name(args, meta)
    npz_path = os.path.join(args.sample_dir, f"{name}.npz")
    shard_dir = os.path.join(args.sample_dir, f"{name}.shards")
    png_dir = os.path.join(args.sample_dir, name)
    n, batch = args.num_fid_samples, args.per_proc_batch_size
    fp = fingerprint(model, args, meta, device)
    state = _prepare_state(shard_dir, npz_path, fp, rank)

    # a completed run (every rank sees the same files; only the npz header is read): nothing to sample
    done = (state.get("complete") == {"num_samples": n}
            and _npz_shape(npz_path) == ((n, args.image_size, args.image_size, 3), np.dtype(np.uint8)))
    if done and not args.save_png:
        if rank == 0:
            print(f"{npz_path} is already complete ({n} samples); nothing to do")
            print(f"Saved .npz file to {npz_path} [shape=({n}, {args.image_size}, {args.image_size}, 3)]")
        return npz_path

    starts = list(range(0, n, batch))
    image_shape = (args.image_size, args.image_size, 3)
    if done:  # --save-png on a completed run: only the PNGs are missing
        if rank == 0:
            os.makedirs(png_dir, exist_ok=True)
            for start, arr in _npz_chunks(npz_path, batch):
                _save_pngs(png_dir, start, arr)
            print(f"Saved .npz file to {npz_path} [shape=({n}, {image_shape[0]}, {image_shape[1]}, 3)]")
        return npz_path

    mine = [k for k in range(len(starts)) if k % world == rank]
    vae = load_vae(args.vae, device)
    model = model.to(device)
    sample = make_sampler(model, args.num_sampling_steps, args.cfg_scale, clip_denoised=args.vae == "none",
                          dtype=args.dtype)
    if args.save_png:
        os.makedirs(png_dir, exist_ok=True)
    if rank == 0:
        kind = f"quantized ({os.path.basename(os.path.normpath(args.path))})" if quantized else "full precision"
        print(f"sampling {n} images ({args.model}, {kind}) on {world} process(es), {len(starts)} shards of "
              f"<= {batch}: {shard_dir}", flush=True)

    from tqdm import tqdm
    made = 0
    for k in tqdm(mine, desc=f"rank {rank} shards", disable=rank != 0):
        start = starts[k]
        count = min(batch, n - start)
        path = _shard_path(shard_dir, start)
        arr = _read_shard(path, (count, *image_shape)) if os.path.exists(path) else None
        if arr is None:  # missing, or left corrupt/mismatched: (re)sample it
            gens, y, z = sample_inputs(args.global_seed, range(start, start + count), args.num_classes,
                                       (channels, size, size))
            arr = to_uint8(decode(vae, sample(z, y, gens))).cpu().numpy()
            if arr.shape != (count, *image_shape):
                raise RuntimeError(f"sampled shape {arr.shape}, expected {(count, *image_shape)}")
            if args.save_png:  # PNGs first: a present shard implies its PNGs exist
                _save_pngs(png_dir, start, arr)
            _atomic_write(path, lambda f, arr=arr: np.save(f, arr, allow_pickle=False))
            made += 1
        elif args.save_png:
            _save_pngs(png_dir, start, arr)

    _barrier()
    if rank == 0:
        def arrays():
            for start in starts:
                count = min(batch, n - start)
                arr = _read_shard(_shard_path(shard_dir, start), (count, *image_shape))
                if arr is None:
                    raise RuntimeError(f"shard {start} missing or unreadable in {shard_dir} after all ranks finished")
                yield arr

        write_npz(npz_path, n, image_shape, arrays())
        _write_json(os.path.join(shard_dir, STATE_FILE), {"fingerprint": fp, "complete": {"num_samples": n}})
        if not args.keep_shards:
            for start in starts:
                p = _shard_path(shard_dir, start)
                if os.path.exists(p):
                    os.remove(p)
        print(f"Saved .npz file to {npz_path} [shape=({n}, {image_shape[0]}, {image_shape[1]}, 3)] "
              f"({made} of {len(starts)} shards sampled by rank 0)")
    return npz_path


def _npz_chunks(path, batch):
    """(start, uint8 array) chunks of arr_0, read from the .npz without loading it whole."""
    with zipfile.ZipFile(path) as zf, zf.open("arr_0.npy") as f:
        shape, _, _ = _read_header(f)
        per = int(np.prod(shape[1:]))
        for start in range(0, shape[0], batch):
            count = min(batch, shape[0] - start)
            yield start, np.frombuffer(f.read(count * per), dtype=np.uint8).reshape(count, *shape[1:])


def build_parser():
    parser = ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser, image_size=256, num_classes=1000, vae="ema", cfg_scale=1.5, steps=250)
    # None = "not given": taken from --path's checkpoint, else upstream's defaults (MODEL_DEFAULTS)
    parser.set_defaults(model=None, image_size=None, num_classes=None, vae=None)
    parser.add_argument("--sample-dir", type=str, default="samples")
    parser.add_argument("--per-proc-batch-size", type=int, default=32)
    parser.add_argument("--num-fid-samples", type=int, default=50_000)
    parser.add_argument("--global-seed", type=int, default=0)
    parser.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                        help="allow TF32 matmuls/convolutions on Ampere+ GPUs (default on)")
    parser.add_argument("--path", type=str, default=None, help="a quantized checkpoint directory (QuantDiT.py)")
    parser.add_argument("--weight-bit", type=int, default=None, help="optional check against the checkpoint")
    parser.add_argument("--act-bit", type=int, default=None, help="optional check against the checkpoint")
    parser.add_argument("--backend", choices=["fake", "int"], default="fake",
                        help="fake: quantize-dequantize in float; int: integer GEMMs (fused AVX512-VNNI CPU kernel, else torch._int_mm)")
    add_dtype_arg(parser)
    parser.add_argument("--save-png", action="store_true", help="also write one PNG per sample")
    parser.add_argument("--keep-shards", action="store_true", help="keep the shard files after writing the .npz")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    return parser


if __name__ == "__main__":
    run(main, build_parser().parse_args())

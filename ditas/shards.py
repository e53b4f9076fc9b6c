"""The shard store of sample_merge_TAS.py: resumable, world-size-independent sample batches in ADM's .npz.

Files, in the sample directory, for a batch called <name>:
    <name>.npz            arr_0: uint8 (N, H, W, 3)
    <name>.shards/        work in progress: shard-<first index>.npy (uint8 NHWC) + state.json
    <name>/000000.png ... only with --save-png (one PNG per sample, upstream's layout)

The N samples are cut into shards of `batch` consecutive indices (the last one may be short).
Every file is written atomically (quant/io/files.py), so a killed run leaves only complete shards.
state.json holds a fingerprint of everything a shard's bytes depend on; shards made under another
fingerprint are discarded. Once the .npz is written the shards are deleted (unless kept) and
state.json records the completed run.
"""
import json
import os
import zipfile

import numpy as np

from quant.io.files import atomic_write, write_json

STATE_FILE = "state.json"


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _read_header(f):
    """(shape, fortran_order, dtype) of the .npy stream f, positioned at its start."""
    major, _ = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    return read(f)


def npz_shape(path):
    """(shape, dtype) of arr_0 in an .npz without reading the array, or None."""
    try:
        with zipfile.ZipFile(path) as zf, zf.open("arr_0.npy") as f:
            shape, _, dtype = _read_header(f)
        return tuple(shape), np.dtype(dtype)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None


def npz_chunks(path, batch):
    """(start, uint8 array) chunks of arr_0, read from the .npz without loading it whole."""
    with zipfile.ZipFile(path) as zf, zf.open("arr_0.npy") as f:
        shape, _, _ = _read_header(f)
        per = int(np.prod(shape[1:]))
        for start in range(0, shape[0], batch):
            count = min(batch, shape[0] - start)
            yield start, np.frombuffer(f.read(count * per), dtype=np.uint8).reshape(count, *shape[1:])


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

    atomic_write(path, write)


class ShardStore:
    """The files of one sample batch: n samples of image_shape (H, W, 3) in shards of `batch`."""

    def __init__(self, sample_dir, name, n, batch, image_shape):
        self.npz_path = os.path.join(sample_dir, f"{name}.npz")
        self.shard_dir = os.path.join(sample_dir, f"{name}.shards")
        self.png_dir = os.path.join(sample_dir, name)
        self.n, self.batch, self.image_shape = n, batch, tuple(image_shape)
        self.starts = list(range(0, n, batch))

    def count(self, start):
        return min(self.batch, self.n - start)

    def _shard_path(self, start):
        return os.path.join(self.shard_dir, f"shard-{start:08d}.npy")

    def prepare(self, fingerprint):
        """Drop shards of another fingerprint and stale temporaries (one process, rank 0, before the others read)."""
        os.makedirs(self.shard_dir, exist_ok=True)
        npz_dir, npz_name = os.path.split(self.npz_path)
        for fname in os.listdir(npz_dir):  # a .npz write killed half-way
            if fname.startswith(npz_name + ".tmp-"):
                os.remove(os.path.join(npz_dir, fname))
        state = self.state()
        stale = state is None or state.get("fingerprint") != fingerprint
        for fname in os.listdir(self.shard_dir):
            if ".tmp-" in fname or (stale and fname.startswith("shard-")):
                os.remove(os.path.join(self.shard_dir, fname))
        if stale:
            if state is not None:
                print(f"{self.shard_dir}: existing shards were made with other settings; starting over", flush=True)
            write_json(os.path.join(self.shard_dir, STATE_FILE), {"fingerprint": fingerprint, "complete": None},
                       sort_keys=True)

    def state(self):
        return _read_json(os.path.join(self.shard_dir, STATE_FILE))

    def complete(self):
        """Is the .npz of this batch written (state says so and its header has the shape)?"""
        state = self.state() or {}
        return (state.get("complete") == {"num_samples": self.n}
                and npz_shape(self.npz_path) == ((self.n, *self.image_shape), np.dtype(np.uint8)))

    def read(self, start):
        """Shard `start` if it is complete and has the expected shape/dtype, else None."""
        try:
            arr = np.load(self._shard_path(start), allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return None
        return arr if arr.dtype == np.uint8 and arr.shape == (self.count(start), *self.image_shape) else None

    def write(self, start, arr):
        if arr.shape != (self.count(start), *self.image_shape):
            raise RuntimeError(f"sampled shape {arr.shape}, expected {(self.count(start), *self.image_shape)}")
        atomic_write(self._shard_path(start), lambda f: np.save(f, arr, allow_pickle=False))

    def save_pngs(self, start, arr):
        """PNG files of samples start.. (those not written yet)."""
        from PIL import Image
        os.makedirs(self.png_dir, exist_ok=True)
        for j, img in enumerate(arr):
            path = os.path.join(self.png_dir, f"{start + j:06d}.png")
            if not os.path.exists(path):
                atomic_write(path, lambda f, img=img: Image.fromarray(img).save(f, format="PNG"))

    def merge(self, fingerprint, keep_shards=False):
        """Write the .npz from every shard, mark the run complete, delete the shards (unless kept)."""
        def arrays():
            for start in self.starts:
                arr = self.read(start)
                if arr is None:
                    raise RuntimeError(f"shard {start} missing or unreadable in {self.shard_dir} after all ranks finished")
                yield arr

        write_npz(self.npz_path, self.n, self.image_shape, arrays())
        write_json(os.path.join(self.shard_dir, STATE_FILE),
                   {"fingerprint": fingerprint, "complete": {"num_samples": self.n}}, sort_keys=True)
        if not keep_shards:
            for start in self.starts:
                p = self._shard_path(start)
                if os.path.exists(p):
                    os.remove(p)

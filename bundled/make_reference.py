"""Write the reference batch of real digits in ADM's evaluator format.

    python bundled/make_reference.py                  # -> assets/digits_ref.npz

Key `arr_0`: all 1797 digits as uint8 N x 16 x 16 x 3 (pipeline.to_uint8, the same
conversion the samplers use); key `labels`: their classes (ADM ignores extra keys).
"""
import argparse
import os

from ditas import threads  # (before torch: sets OpenMP's wait policy, read when torch loads)
import numpy as np
from bundled.digits import IMAGE_SIZE, load_digits_tensors
from ditas.pipeline import to_uint8

DEFAULT_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "digits_ref.npz")



def main(args):
    threads.set_threads(args.threads)
    images, labels = load_digits_tensors(args.image_size)
    arr = to_uint8(images).numpy()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    np.savez_compressed(args.out, arr_0=arr, labels=labels.numpy())
    print(f"Saved {args.out}: arr_0 {arr.shape} {arr.dtype}, labels {tuple(labels.shape)} "
          f"({os.path.getsize(args.out) / 1024:.0f} KiB)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=str, default=DEFAULT_PATH)
    parser.add_argument("--image-size", type=int, default=IMAGE_SIZE)
    threads.add_threads_arg(parser)
    main(parser.parse_args())

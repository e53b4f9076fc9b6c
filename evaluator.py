"""FID / sFID / Inception Score / precision / recall of a sample batch against a reference batch.

    python evaluator.py REF.npz SAMPLE.npz [--features inception|digits] [--json OUT]

Both files are in ADM's format (key `arr_0`, uint8, N x H x W x 3) and the output
mirrors openai/guided-diffusion's evaluations/evaluator.py.  Feature extractors:

  inception  ADM-compatible InceptionV3 (pool_3 2048-d, mixed_6/conv first 7 channels
             2023-d, logits without bias), through the optional package torch-fidelity
             and its converted TF weights file (see INCEPTION_WEIGHTS_URL); the network
             is TF's 2015 graph, with TF1-style bilinear resizing to 299x299.
  digits     the bundled digit classifier (bundled/classifier.py), fully offline; its
             numbers are comparable only with other digits-feature numbers.

`evaluate(ref, sample, extractor)` is the importable entry point for benchmarks.
"""
import os
import sys
import zipfile

import numpy as np
from ditas import threads  # before torch: sets OpenMP's wait policy, read when torch loads
import torch
from tqdm import tqdm

from ditas.cli import ArgumentParser, UserError, check_positive, check_writable, run
from bundled.classifier import DEFAULT_PATH as DIGITS_CLASSIFIER_PATH, load_classifier, uint8_to_input
from metrics import PR_DTYPES, compute_statistics, frechet_distance, inception_score_from_logits, precision_recall
from quant.io import files

INCEPTION_WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                         "weights-inception-2015-12-05-6726825d.pth")
DEFAULT_INCEPTION_WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrained_models",
                                         os.path.basename(INCEPTION_WEIGHTS_URL))
PR_K = 3  # ADM's neighbourhood size for precision / recall


class EvalError(ValueError):
    """A problem with the user's input or setup: reported as one stderr line, exit code 2."""


def to_numpy(features):
    return {name: f.float().cpu().numpy() for name, f in features.items()}


class DigitsFeatures:
    """--features digits: the bundled classifier (pool -> FID/PR, spatial -> sFID, logits -> IS)."""
    name = "digits"

    def __init__(self, path=DIGITS_CLASSIFIER_PATH, device="cpu"):
        if not os.path.isfile(path):
            raise EvalError(f"digits classifier weights not found at {path}; run `python bundled/train_classifier.py`")
        self.device = device
        self.model = load_classifier(path).to(device)

    @torch.no_grad()
    def __call__(self, images):
        return to_numpy(self.model.features(uint8_to_input(images).to(self.device)))


def import_inception():
    """(torch-fidelity's FeatureExtractorInceptionV3, None), or (None, why it cannot be imported)."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except Exception as e:  # a broken torchvision surfaces as RuntimeError, not ImportError
        return None, f"{type(e).__name__}: {e}"
    return FeatureExtractorInceptionV3, None


class InceptionFeatures:
    """--features inception: torch-fidelity's TF-compatible InceptionV3 with ADM's three taps.

    pool_3 is torch-fidelity's '2048' and ADM's IS logits are its 'logits_unbiased' (ADM
    multiplies pool_3 by the softmax weights without the bias).  TF's `mixed_6/conv` is the
    1x1 branch of the third 17x17 block, Mixed_6d.branch1x1 here (post-ReLU); ADM keeps its
    first 7 channels, flattened in NHWC order (17 * 17 * 7 = 2023).
    """
    name = "inception"

    def __init__(self, weights_path, device="cpu"):
        inception_cls, import_error = import_inception()
        missing = []
        if import_error:
            missing.append(f"`pip install torch-fidelity` (import failed: {import_error})")
        if not os.path.isfile(weights_path):
            missing.append(f"the weights file {INCEPTION_WEIGHTS_URL} saved as {weights_path} "
                           "(or pass --inception-weights PATH, or set DITAS_INCEPTION_WEIGHTS)")
        if missing:
            raise EvalError("--features inception needs " + " and ".join(missing) + "; --features digits works offline")
        try:  # torch-fidelity unpickles with weights_only=False: make sure the file holds tensors only
            torch.load(weights_path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise EvalError(f"{weights_path} is not a plain state dict of tensors ({type(e).__name__})") from None
        self.device = device
        self.model = inception_cls("inception-v3-compat", ["2048", "logits_unbiased"],
                                   feature_extractor_weights_path=weights_path).to(device)

    @torch.no_grad()
    def __call__(self, images):
        captured = {}
        hook = self.model.Mixed_6d.branch1x1.register_forward_hook(
            lambda module, inputs, output: captured.update(spatial=output[:, :7].clone()))
        try:
            pool, logits = self.model(torch.as_tensor(images).permute(0, 3, 1, 2).contiguous().to(self.device))
        finally:
            hook.remove()
        spatial = captured["spatial"].permute(0, 2, 3, 1).flatten(1)
        return to_numpy({"pool": pool, "spatial": spatial, "logits": logits})


def make_extractor(name, inception_weights=None, device="cpu"):
    """Build the feature extractor for --features `name` (EvalError when it cannot be set up)."""
    if name == "digits":
        return DigitsFeatures(device=device)
    weights = inception_weights or os.environ.get("DITAS_INCEPTION_WEIGHTS") or DEFAULT_INCEPTION_WEIGHTS
    return InceptionFeatures(weights, device=device)


def load_images(path):
    """`arr_0` of an ADM-format .npz, checked for what the metrics rely on (EvalError otherwise)."""
    if not os.path.exists(path):
        raise EvalError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        raise EvalError(f"{path} is not an .npz file")
    try:
        with np.load(path, allow_pickle=False) as data:
            keys = data.files
            images = data["arr_0"] if "arr_0" in keys else None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise EvalError(f"{path}: cannot read arr_0 ({type(e).__name__}: {e})") from None
    if images is None:
        raise EvalError(f"{path} has no arr_0 (keys: {', '.join(keys) or 'none'})")
    if images.dtype != np.uint8:
        raise EvalError(f"{path}: arr_0 has dtype {images.dtype}, expected uint8 (clamp(127.5 x + 128, 0, 255))")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise EvalError(f"{path}: arr_0 has shape {images.shape}, expected N x H x W x 3")
    return images


def check_pair(ref_images, sample_images):
    """The two batches must be comparable: same image size, enough images for the k-NN radii."""
    if ref_images.shape[1:3] != sample_images.shape[1:3]:
        raise EvalError(f"sample images are {sample_images.shape[1]}x{sample_images.shape[2]} but reference "
                        f"images are {ref_images.shape[1]}x{ref_images.shape[2]}")
    for what, images in (("reference", ref_images), ("sample", sample_images)):
        if len(images) <= PR_K:
            raise EvalError(f"the {what} batch has {len(images)} images; at least {PR_K + 1} are needed")


def extract_features(extractor, images, batch_size=100, desc="features", progress=True):
    """Run `extractor` over uint8 NHWC `images` in batches; concatenated {'pool','spatial','logits'}."""
    chunks = [extractor(images[i:i + batch_size])
              for i in tqdm(range(0, len(images), batch_size), desc=desc, disable=not progress)]
    return {name: np.concatenate([c[name] for c in chunks]) for name in chunks[0]}


def evaluate(ref_images, sample_images, extractor, batch_size=100, progress=True, pr_dtype="float16"):
    """ADM's metrics of `sample_images` against `ref_images` (uint8 N x H x W x 3) in `extractor`'s features.

    pr_dtype="float16" computes precision / recall with ADM's float16 distances (its numbers);
    "float32" with float32 distances.
    """
    check_pair(ref_images, sample_images)
    ref = extract_features(extractor, ref_images, batch_size, "reference batch", progress)
    sample = extract_features(extractor, sample_images, batch_size, "sample batch", progress)
    precision, recall = precision_recall(ref["pool"], sample["pool"], k=PR_K, dtype=pr_dtype)
    return {
        "inception_score": inception_score_from_logits(sample["logits"]),
        "fid": frechet_distance(*compute_statistics(sample["pool"]), *compute_statistics(ref["pool"])),
        "sfid": frechet_distance(*compute_statistics(sample["spatial"]), *compute_statistics(ref["spatial"])),
        "precision": precision,
        "recall": recall,
    }


def write_json(path, obj):
    """The metrics as JSON, written atomically (quant/io/files.py)."""
    files.write_json(path, obj, indent=2, end="\n")


def check_device(spec):
    """--device: cpu, cuda or cuda:N, a GPU only where one is visible (UserError otherwise)."""
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UserError(f"--device {spec!r} is not a device (cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {spec!r}: the evaluator runs on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {spec} but no CUDA GPU is available (use --device cpu)")
    return device


def main(args):
    threads.set_threads(args.threads)
    check_positive(args.batch_size, "--batch-size")
    check_device(args.device)
    if args.json:
        check_writable(args.json, "--json")
    try:
        ref_images = load_images(args.ref_batch)
        sample_images = load_images(args.sample_batch)
        check_pair(ref_images, sample_images)
        extractor = make_extractor(args.features, args.inception_weights, args.device)
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    metrics = evaluate(ref_images, sample_images, extractor, args.batch_size, pr_dtype=args.pr_dtype)
    print("Computing evaluations...")
    print("Inception Score:", metrics["inception_score"])
    print("FID:", metrics["fid"])
    print("sFID:", metrics["sfid"])
    print("Precision:", metrics["precision"])
    print("Recall:", metrics["recall"])
    if args.json:
        write_json(args.json, {**metrics, "features": extractor.name, "ref_batch": args.ref_batch,
                               "sample_batch": args.sample_batch, "num_ref": len(ref_images),
                               "num_samples": len(sample_images), "pr_dtype": args.pr_dtype})
    return metrics


def build_parser():
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ref_batch", type=str, help="reference .npz (arr_0: uint8 N x H x W x 3)")
    parser.add_argument("sample_batch", type=str, help="sample .npz in the same format")
    parser.add_argument("--features", choices=["inception", "digits"], default="inception",
                        help="inception: ADM-compatible, needs torch-fidelity and its weights file; "
                             "digits: the bundled digit classifier, offline")
    parser.add_argument("--inception-weights", type=str, default=None,
                        help=f"torch-fidelity Inception weights (default: $DITAS_INCEPTION_WEIGHTS, "
                             f"else {os.path.relpath(DEFAULT_INCEPTION_WEIGHTS)})")
    parser.add_argument("--batch-size", type=int, default=100, help="images per feature-extractor batch")
    parser.add_argument("--pr-dtype", choices=PR_DTYPES, default="float16",
                        help="arithmetic of the precision / recall distances: float16 is ADM's evaluator's "
                             "(float16, with its float32 fallback on overflow); float32 rounds less and counts "
                             "a few near-ties fewer as inside (default: %(default)s)")
    parser.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the feature extractor runs")
    threads.add_threads_arg(parser)
    parser.add_argument("--json", type=str, default=None, help="also write the metrics to this JSON file")
    return parser


if __name__ == "__main__":
    run(main, build_parser().parse_args())

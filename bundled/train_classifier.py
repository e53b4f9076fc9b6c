"""Train the small digit classifier whose features the evaluator uses offline (--features digits).

    python bundled/train_classifier.py                # -> assets/digits_classifier.safetensors

Trains on 80% of scikit-learn's digits (16x16 RGB, see bundled/digits.py), prints the accuracy
on the held-out 20%, and saves the weights with safetensors.  Inputs go through the
same uint8 round trip as an ADM .npz, and training uses 1-pixel shifts and pixel
noise so the features stay sensible on imperfect generated samples.
"""
import argparse
import os
import time

from ditas import threads  # (before torch: sets OpenMP's wait policy, read when torch loads)
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from sklearn.model_selection import train_test_split
from bundled.classifier import DEFAULT_PATH, DigitClassifier, uint8_to_input
from bundled.digits import IMAGE_SIZE, NUM_CLASSES, load_digits_tensors
from ditas.pipeline import to_uint8

def quantize(x):
    """What the evaluator sees: [-1, 1] floats -> ADM uint8 -> back to [-1, 1]."""
    return uint8_to_input(to_uint8(x))


def augment(x, generator, max_shift=1, max_noise=0.1):
    """Random shifts of up to `max_shift` pixels (background-padded) plus Gaussian pixel noise."""
    n, _, h, w = x.shape
    padded = F.pad(x, [max_shift] * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator).tolist()
    x = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    sigma = torch.rand(n, 1, 1, 1, generator=generator) * max_noise
    return quantize(x + sigma * torch.randn(x.shape, generator=generator))


@torch.no_grad()
def accuracy(model, x, y, batch_size=512):
    correct = sum((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum().item()
                  for i in range(0, len(x), batch_size))
    return correct / len(x)


def main(args):
    torch.manual_seed(args.seed)
    threads.set_threads(args.threads)
    generator = torch.Generator().manual_seed(args.seed)

    images, labels = load_digits_tensors(IMAGE_SIZE)
    train_idx, test_idx = train_test_split(torch.arange(len(labels)).numpy(), test_size=args.test_fraction,
                                           random_state=args.seed, stratify=labels.numpy())
    x_train, y_train = images[train_idx], labels[train_idx]
    x_test, y_test = quantize(images[test_idx]), labels[test_idx]

    model = DigitClassifier(num_classes=NUM_CLASSES, width=args.width, feature_dim=args.feature_dim)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = (len(x_train) + args.batch_size - 1) // args.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch)

    start = time.time()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=generator)
        total = 0.0
        for i in range(0, len(perm), args.batch_size):
            idx = perm[i:i + args.batch_size]
            loss = F.cross_entropy(model(augment(x_train[idx], generator)), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if (epoch + 1) % 5 == 0 or epoch == args.epochs - 1:
            model.eval()
            print(f"epoch {epoch + 1:3d}  loss {total / len(x_train):.4f}  "
                  f"test acc {accuracy(model, x_test, y_test):.4f}  ({time.time() - start:.0f}s)")

    model.eval()
    test_acc = accuracy(model, x_test, y_test)
    meta = {"num_classes": NUM_CLASSES, "width": args.width, "feature_dim": args.feature_dim,
            "image_size": IMAGE_SIZE, "seed": args.seed, "epochs": args.epochs,
            "test_accuracy": f"{test_acc:.4f}", "test_size": len(test_idx)}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.out,
              metadata={k: str(v) for k, v in meta.items()})
    print(f"Test accuracy: {test_acc:.4f} ({len(test_idx)} held-out digits)")
    print(f"Saved {args.out} ({os.path.getsize(args.out) / 1024:.0f} KiB)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=str, default=DEFAULT_PATH)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--feature-dim", type=int, default=64)
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (the recorded asset used 1)")
    main(parser.parse_args())

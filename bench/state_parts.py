"""The calibration's search state of a DiT by part, from quant/calibration/budget.py's formulas (no weights, no run).

    python bench/state_parts.py                       # DiT-XL/2, QuantDiT's defaults (ditas), CPU and CUDA
    python bench/state_parts.py --model DiT-S/2 --extra "--search exact"

Per part (kept candidates, round-to-nearest baselines, loss-engine operands, pass-1 statistics and their
per-step activation ranges over a loop of --steps steps at --image-size, batch 32) the bytes summed over
every quantized layer, for the QuantConfig that QuantDiT.py builds from its defaults plus --extra, and
the total's share in host memory (the ranges, on CUDA). tests/test_budget.py checks each formula against
the bytes actually held, and bench/scale.py reports the total of a real run (state_bytes_estimated) and
projects the peaks. Prints a markdown table.
"""
import os
import shlex
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import torch  # noqa: E402
from ditas import cli  # noqa: E402
from models import DiT_models  # noqa: E402
from quant.calibration.budget import GIB, by_memory, layer_state_parts  # noqa: E402
from quant.calibration.feed import LoopShape  # noqa: E402
from quant.method.layers import quantizable_layers  # noqa: E402


def quant_config(extra):
    """The QuantConfig of `QuantDiT.py <extra>` (its own parser and defaults)."""
    import QuantDiT
    return QuantDiT.quant_config_from_args(QuantDiT.build_parser().parse_args(shlex.split(extra)))


def parts(model_name, cfg, device_type, loop=None):
    """{part: bytes} summed over the model's quantized layers (the ranges over an FP loop of shape `loop`)."""
    with torch.device("meta"):  # shapes only
        model = DiT_models[model_name](input_size=4, in_channels=4, num_classes=1000)
    total = {}
    for lin in quantizable_layers(model).values():
        for k, v in layer_state_parts(*lin.weight.shape, cfg, device_type, loop=loop).items():
            total[k] = total.get(k, 0) + v
    return total


def main(args):
    if args.model not in DiT_models:
        raise cli.UserError(f"unknown --model {args.model!r}; one of {', '.join(DiT_models)}")
    cfg = quant_config(args.extra)
    patch = int(args.model.rsplit("/", 1)[1])
    loop = LoopShape(args.steps, 32, (args.image_size // 8 // patch) ** 2)  # 16 labels x 2 (guidance)
    rows = {d: parts(args.model, cfg, d, loop) for d in ("cpu", "cuda")}
    names = list(rows["cpu"])
    unit, size = ("GiB", GIB) if sum(rows["cpu"].values()) >= GIB else ("MiB", 2 ** 20)
    print(f"{args.model}, `QuantDiT.py {args.extra}`: scheme {cfg.scheme}, search {cfg.search}, {unit} (the ranges: "
          f"{args.steps} steps at {args.image_size} px, batch 32)\n")
    print("| device | " + " | ".join(names) + " | total | of which host |")
    print("|---|" + "---:|" * (len(names) + 2))
    for d, p in rows.items():
        print(f"| {d} | " + " | ".join(f"{p[n] / size:.3f}" for n in names) + f" | {sum(p.values()) / size:.3f} | "
              f"{by_memory(p, d)['host'] / size:.3f} |")


def build_parser():
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="DiT-XL/2", help="DiT variant")
    p.add_argument("--extra", default="", help="QuantDiT.py flags, one string")
    p.add_argument("--steps", type=int, default=100, help="calibration steps (QuantDiT's default)")
    p.add_argument("--image-size", type=int, default=256, help="pixels (the latent is 1/8)")
    return p


if __name__ == "__main__":
    cli.run(main, build_parser().parse_args())

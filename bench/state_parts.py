"""The calibration's search state of a DiT by part, from quant/budget.py's formulas (no weights, no run).

    python bench/state_parts.py                       # DiT-XL/2, QuantDiT's defaults (ditas), CPU and CUDA
    python bench/state_parts.py --model DiT-S/2 --extra "--search exact"

Per part (kept candidates, round-to-nearest baselines, loss-engine operands, pass-1 statistics) the bytes
summed over every quantized layer, for the QuantConfig that QuantDiT.py builds from its defaults plus
--extra. tests/test_budget.py checks each formula against the bytes actually held, and bench/scale.py
reports the total of a real run (state_bytes_estimated). Prints a markdown table.
"""
import os
import shlex
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import torch  # noqa: E402
import cli  # noqa: E402
from models import DiT_models  # noqa: E402
from quant.budget import GIB, layer_state_parts  # noqa: E402
from quant.layers import quantizable_layers  # noqa: E402


def quant_config(extra):
    """The QuantConfig of `QuantDiT.py <extra>` (its own parser and defaults)."""
    import QuantDiT
    return QuantDiT.quant_config_from_args(QuantDiT.build_parser().parse_args(shlex.split(extra)))


def parts(model_name, cfg, device_type):
    """{part: bytes} summed over the model's quantized layers."""
    with torch.device("meta"):  # shapes only
        model = DiT_models[model_name](input_size=4, in_channels=4, num_classes=1000)
    total = {}
    for lin in quantizable_layers(model).values():
        for k, v in layer_state_parts(*lin.weight.shape, cfg, device_type).items():
            total[k] = total.get(k, 0) + v
    return total


def main(args):
    if args.model not in DiT_models:
        raise cli.UserError(f"unknown --model {args.model!r}; one of {', '.join(DiT_models)}")
    cfg = quant_config(args.extra)
    rows = {d: parts(args.model, cfg, d) for d in ("cpu", "cuda")}
    names = list(rows["cpu"])
    unit, size = ("GiB", GIB) if sum(rows["cpu"].values()) >= GIB else ("MiB", 2 ** 20)
    print(f"{args.model}, `QuantDiT.py {args.extra}`: scheme {cfg.scheme}, search {cfg.search}, {unit}\n")
    print("| device | " + " | ".join(names) + " | total |")
    print("|---|" + "---:|" * (len(names) + 1))
    for d, p in rows.items():
        print(f"| {d} | " + " | ".join(f"{p[n] / size:.3f}" for n in names) + f" | {sum(p.values()) / size:.3f} |")


def build_parser():
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="DiT-XL/2", help="DiT variant")
    p.add_argument("--extra", default="", help="QuantDiT.py flags, one string")
    return p


if __name__ == "__main__":
    cli.run(main, build_parser().parse_args())

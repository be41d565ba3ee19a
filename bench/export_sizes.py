"""The packed size of every arch x bit (APoT; uniform has the same level counts, so the same size), as the
Markdown table of docs/EXPORT.md.

    python bench/export_sizes.py                 # width 16 (the sweep's), seed 0
    python bench/export_sizes.py --width 64

Each row is ``apot.export.export_model`` of a freshly initialised model (``torch.manual_seed(seed)``): the
packed size depends on the architecture, the bit width and (through the 8-bit layers' code range, see
apot.export) on the first and last layers' weights, never on anything else a training run changes.
"""

from __future__ import annotations

import argparse

import torch

from apot.export import export_model
from apot.models import create_model
from apot.quant import LEVEL_BITS
from apot.report import model_name


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", nargs="+", default=["resnet18", "resnet34", "resnet50"])
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    bits = sorted(LEVEL_BITS, reverse=True)
    print("| Model | FP32 (KB) | " + " | ".join(f"{b}-bit (KB, ratio)" for b in bits) + " |")
    print("|:---|---:|" + "---:|" * len(LEVEL_BITS))
    for arch in args.archs:
        cells, fp32 = [], None
        for bit in bits:
            torch.manual_seed(args.seed)
            model = create_model(arch, bit, power=True, width=args.width).eval()
            config = {"arch": arch, "bit": bit, "power": True, "width": args.width}
            size = export_model(model, config, {})["size"]
            fp32 = size["fp32_kb"]
            cells.append(f"{size['size_kb']:.1f} (1/{size['compression']:.2f})")
        print(f"| {model_name(arch)} | {fp32:.1f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

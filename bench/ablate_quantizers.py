"""Where the quantized CPU step's extra time goes: the same step with the weight quantizer, the activation
quantizer or both taken out, against FP32.

    python bench/ablate_quantizers.py                          # resnet18/34/50, 2-bit APoT, 1 thread
    python bench/ablate_quantizers.py --archs resnet50 --bit 4 --rounds 30

Variants of one model (seed 0, the eager step of ``apot.step.build_step``, a fixed random batch):

    fp32     the FP32 model
    quant    the quantized model as it trains
    no-wq    its convolutions use the raw weight: no standardisation, no weight quantizer
    no-aq    its convolutions take the raw input: no activation quantizer
    no-q     neither (the quantized model's layers, convolving like FP32)

The steps of ``no-*`` are not training steps of any model worth training; they bound what a faster weight or
activation path could save: quant - no-wq is all the weight path costs in the step, quant - no-aq all the
activation path costs. Every variant is stepped once per round, the rounds interleaved and rotated (as
bench_step.py does), and the median per variant printed with its ratio to FP32.
"""

from __future__ import annotations

import argparse
import statistics
import time
import types
from collections.abc import Callable

import torch
import torch.nn.functional as F

from apot.layers import QuantConv2d
from apot.models import create_model
from apot.provenance import cpu_model
from apot.step import build_step


def _raw_weight(conv: QuantConv2d) -> None:
    conv.quantized_weight = lambda: conv.weight


def _raw_input(conv: QuantConv2d) -> None:
    def forward(self: QuantConv2d, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.quantized_weight(), self.bias, self.stride, self.padding, self.dilation,
                        self.groups)
    conv.forward = types.MethodType(forward, conv)


VARIANTS: dict[str, tuple[bool, tuple[Callable[[QuantConv2d], None], ...]]] = {
    "fp32": (False, ()),
    "quant": (True, ()),
    "no-wq": (True, (_raw_weight,)),
    "no-aq": (True, (_raw_input,)),
    "no-q": (True, (_raw_weight, _raw_input)),
}


def make_step(arch: str, bit: int, power: bool, quantized: bool, patches, batch: int,
              width: int) -> Callable[[], float]:
    """Seconds of one training step of this variant, as a function."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    torch.manual_seed(0)
    model = create_model(arch, bit=bit if quantized else 32, power=power, width=width)
    for module in model.modules():
        if isinstance(module, QuantConv2d) and not module.config.full_precision:
            for patch in patches:
                patch(module)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    step = build_step(model, opt, F.cross_entropy, mode="eager", device=torch.device("cpu"))

    def timed() -> float:
        start = time.perf_counter()
        step(x, y)
        return time.perf_counter() - start
    return timed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", nargs="+", default=["resnet18", "resnet34", "resnet50"])
    p.add_argument("--bit", type=int, default=2)
    p.add_argument("--quantizer", default="apot", choices=["apot", "uniform"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--width", type=int, default=16)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    steps = {(arch, name): make_step(arch, args.bit, args.quantizer == "apot", quantized, patches, args.batch,
                                     args.width)
             for arch in args.archs for name, (quantized, patches) in VARIANTS.items()}
    keys = list(steps)
    times: dict[tuple[str, str], list[float]] = {k: [] for k in keys}
    for r in range(args.warmup + args.rounds):
        for key in keys[r % len(keys):] + keys[:r % len(keys)]:
            seconds = steps[key]()
            if r >= args.warmup:
                times[key].append(seconds)
    print(f"{cpu_model()}, torch {torch.__version__}, {args.threads} thread(s); {args.bit}-bit "
          f"{args.quantizer}, width {args.width}, batch {args.batch}; median of {args.rounds} interleaved "
          "rounds\n")
    print("| arch | variant | ms/step | ratio vs FP32 |\n|---|---|---:|---:|")
    for arch in args.archs:
        fp32 = statistics.median(times[(arch, "fp32")])
        for name in VARIANTS:
            med = statistics.median(times[(arch, name)])
            print(f"| {arch} | {name} | {med * 1e3:.1f} | {med / fp32:.3f} |")


if __name__ == "__main__":
    main()

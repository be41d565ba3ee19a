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
activation path costs. The steps are bench_step.py's (``Step``), timed by its ``measure``: one step per
variant a round, the rounds interleaved and rotated; the median per variant is printed with its ratio to FP32.
"""

from __future__ import annotations

import argparse
import types
from collections.abc import Callable

import torch
import torch.nn.functional as F
from bench_step import Step, measure  # run as `python bench/ablate_quantizers.py`: bench/ is on sys.path

from apot.layers import QuantConv2d
from apot.provenance import cpu_model


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


def variant_step(arch: str, variant: str, args: argparse.Namespace) -> Step:
    """The eager ``Step`` of ``arch``, its quantized convs patched as ``variant``."""
    quantized, patches = VARIANTS[variant]
    step = Step(arch, args.bit if quantized else 32, args.quantizer == "apot", "eager", args)
    for module in step.step.net.modules():
        if isinstance(module, QuantConv2d) and not module.config.full_precision:
            for patch in patches:
                patch(module)
    return step


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
    p.set_defaults(device="cpu")  # the CPU step only (what bench_step.Step reads)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    steps = {(arch, name): variant_step(arch, name, args) for arch in args.archs for name in VARIANTS}
    medians = measure(steps, args.rounds, args.warmup)
    print(f"{cpu_model()}, torch {torch.__version__}, {args.threads} thread(s); {args.bit}-bit "
          f"{args.quantizer}, width {args.width}, batch {args.batch}; median of {args.rounds} interleaved "
          "rounds\n")
    print("| arch | variant | ms/step | ratio vs FP32 |\n|---|---|---:|---:|")
    for arch in args.archs:
        for name in VARIANTS:
            med = medians[(arch, name)]
            print(f"| {arch} | {name} | {med * 1e3:.1f} | {med / medians[(arch, 'fp32')]:.3f} |")


if __name__ == "__main__":
    main()

"""apot: Additive Powers-of-Two quantization of ResNets on MNIST, swept with Ray Tune and DDP."""

__version__ = "0.1.0"

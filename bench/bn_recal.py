"""Would a steadier end of training help? Two post-hoc probes on a finished sweep's checkpoints.

    python bench/bn_recal.py --experiment results-dir/r18_apot_cpu_3seeds --data-dir /path/to/mnist

For every trial of the experiment it scores on the 10k test split:

    base       the final checkpoint as trained (must equal the record's final test accuracy: a check)
    recalN     the same weights with every BatchNorm's running statistics re-estimated as an exact average
               over N unaugmented training images (momentum None), instead of the momentum-0.1 average the
               last training batches left. Training never reads running statistics (train mode uses the
               batch's), so this equals doing it inside the loop after the last epoch.
    recalNa    the same with the training augmentation on
    avg2       the mean of the last two epochs' weights (a two-point weight average), BN re-estimated on N
               images

Only training images are used for the statistics; the test split is scored once per variant and never
chooses anything. One line of JSON per trial, then the mean change of each variant against ``base``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
from torch import nn

from apot.checkpoint import load_checkpoint, model_from_state
from apot.data import DeviceMNIST
from apot.distributed import DistInfo
from apot.train import evaluate

STATS_EPOCH = 10_000  # an epoch number no run trains: its permutation is the statistics' image order


def load_model(trial_dir: Path, epoch: int) -> tuple[nn.Module, dict]:
    state = load_checkpoint(trial_dir / f"checkpoint_epoch{epoch:03d}")
    if state is None:
        raise SystemExit(f"error: {trial_dir}: no checkpoint of epoch {epoch}")
    return model_from_state(state), state["config"]


def reestimate_bn(model: nn.Module, data: DeviceMNIST, seed: int, images: int, augment: bool) -> nn.Module:
    """Every BN's running mean and variance as the exact average over ``images`` training images."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    seen = 0
    with torch.no_grad():
        for x, _ in data.train_batches(STATS_EPOCH, seed, 0, 1, 500, augment=augment):
            model(x)
            seen += x.shape[0]
            if seen >= images:
                break
    for m in norms:
        m.momentum = 0.1
    return model


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", required=True, type=Path, help="a sweep's folder (records/ and train/)")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--images", type=int, nargs="+", default=[5000, 20000], help="BN statistics sizes")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = DeviceMNIST.from_root(args.data_dir, device=torch.device("cpu"), augment="shift")
    info = DistInfo()
    deltas: dict[str, list[float]] = {}
    for trial_dir in sorted((args.experiment / "train").iterdir()):
        record = json.loads((args.experiment / "records" / f"{trial_dir.name}.json").read_text())
        epochs = record["config"]["epochs"]
        model, c = load_model(trial_dir, epochs)
        row = {"trial": trial_dir.name, "record": record["final_test_acc"],
               "base": evaluate(model, data, info)[1]}
        for n, augment in [(n, False) for n in args.images] + [(max(args.images), True)]:
            copied = reestimate_bn(copy.deepcopy(model), data, c["seed"], n, augment)
            row[f"recal{n // 1000}k{'a' if augment else ''}"] = evaluate(copied, data, info)[1]
        n = max(args.images)
        previous, _ = load_model(trial_dir, epochs - 1)
        with torch.no_grad():
            for name, value in model.state_dict().items():
                if value.is_floating_point() and "running" not in name:
                    value.copy_((value + previous.state_dict()[name]) / 2)
        row["avg2"] = evaluate(reestimate_bn(model, data, c["seed"], n, False), data, info)[1]
        print(json.dumps(row), flush=True)
        for key, value in row.items():
            if key not in ("trial", "record", "base"):
                deltas.setdefault(key, []).append(value - row["base"])
    print("mean change vs base over", len(next(iter(deltas.values()), [])), "trials:",
          json.dumps({k: round(sum(v) / len(v), 3) for k, v in deltas.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

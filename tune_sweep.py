#!/usr/bin/env python
"""Run the APoT / uniform quantization sweep on Ray Tune and write both accuracy tables.

    python tune_sweep.py                      # embedded local Ray, the 27 trials of search_space.yaml
    python tune_sweep.py --quick              # same grid, a few epochs on a subset (~10 min on 2 cores)
    python tune_sweep.py --address HOST:PORT  # join a running cluster (slurm/ray_cluster.sh does this)
    python tune_sweep.py --resume             # continue an interrupted sweep
    python tune_sweep.py --report-only        # rebuild results and tables from storage, no training
    python tune_sweep.py --dry-run            # print the resolved config, trials, resources; train nothing
    python tune_sweep.py --mlflow sqlite:///mlflow.db   # also log every trial to MLflow (docs/TRACKING.md)

`pip install .` installs this script as the command `apot-sweep` (same flags).

Flow: search_space.yaml -> apot.config (validated before Ray starts) -> apot.sweep (one Tune trial per grid
point, each a TorchTrainer DDP run) -> records/<trial>.json -> apot.report (results.json/csv, tables.md, PNG).
"""

# The docstring above is --help's text. This file is the command line only: flags, the config, then
# apot.orchestrate.run (checks before Ray, Ray and the Tuner, the stop, the report).

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from apot import provenance as code_provenance
from apot.config import ConfigError, load_config
from apot.errors import exit_with_error
from apot.orchestrate import GracefulStop, SweepRequest, run

DEFAULT_CONFIG = "search_space.yaml"


class _VersionAction(argparse.Action):
    """``--version``: the apot version and the git commit, worked out only when asked."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        print(code_provenance.version_text(parser.prog))
        parser.exit()


def default_config() -> Path:
    """``search_space.yaml`` in the working directory, else the one shipped with apot (beside this script in a
    checkout, ``apot/search_space.yaml`` in an installed package)."""
    candidates = [Path(DEFAULT_CONFIG), Path(__file__).with_name(DEFAULT_CONFIG),
                  code_provenance.PACKAGE_DIR / DEFAULT_CONFIG]
    return next((c for c in candidates if c.is_file()), candidates[0])


def readme_path() -> Path:
    """--update-readme's target: the README beside this script (a checkout), else ./README.md (the
    installed command run from a checkout or a project folder of one's own)."""
    beside = Path(__file__).with_name("README.md")
    return beside if beside.is_file() else Path("README.md")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action=_VersionAction, help="print the apot version and git commit, and exit")
    p.add_argument("--config", default=None,
                   help=f"sweep definition (default: ./{DEFAULT_CONFIG}, else the one shipped with apot)")
    p.add_argument("--quick", action="store_true", help="apply the config's quick: section (a short demo)")
    p.add_argument("--address", default=None,
                   help="join this Ray cluster (host:port or auto) instead of starting a private local one")
    p.add_argument("--resume", action="store_true", help="continue the interrupted sweep in storage")
    p.add_argument("--storage", default=None, help="override the config's storage folder")
    p.add_argument("--data-dir", default=None, help="override the MNIST root (else $APOT_DATA_DIR or config)")
    p.add_argument("--report-only", action="store_true", help="rebuild results and tables without training")
    p.add_argument("--update-readme", action="store_true", help="write the tables into README.md")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config, the trials, their resources and the concurrency; train "
                        "nothing (a cluster named by --address or $RAY_ADDRESS is joined for its resources)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.epochs=3 --set grid.bit=[32,4,2]")
    p.add_argument("--mlflow", default=None, metavar="URI",
                   help="log every trial as an MLflow run (sqlite:///mlflow.db, a folder, http://host:port); "
                        "overrides tracking.mlflow of the config; needs the mlflow extra")
    p.add_argument("--display", choices=("auto", "live", "plain"), default="auto",
                   help="live rich table on a terminal, timestamped lines otherwise (default: auto)")
    args = p.parse_args(argv)
    args.default_config = args.config is None
    if args.default_config:
        args.config = str(default_config())
    return args


def main(argv: list[str] | None = None) -> int:
    """The command: flags, then the config, then `apot.orchestrate.run`; the exit code."""
    args = parse_args(argv)
    started = time.time()
    stop = GracefulStop()
    stop.install()  # from the start: a SIGTERM while the config loads stops the sweep before it trains
    if args.default_config and not Path(DEFAULT_CONFIG).is_file():
        print(f"config: {args.config} (the default; no ./{DEFAULT_CONFIG} here, --config to choose)")
    try:
        cfg = load_config(args.config, overrides=args.overrides, quick=args.quick,
                          storage=args.storage, data_dir=args.data_dir, mlflow=args.mlflow)
    except ConfigError as exc:
        return exit_with_error(str(exc))
    request = SweepRequest(address=args.address, resume=args.resume, report_only=args.report_only,
                           dry_run=args.dry_run, display=args.display,
                           readme=readme_path() if args.update_readme else None)
    return run(cfg, request, stop, started=started)


if __name__ == "__main__":
    sys.exit(main())

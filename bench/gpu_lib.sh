# Shared by bench/gpu_decide.sh and bench/gpu_sweep.sh (sourced, not run).

py=${PYTHON:-python3}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

# experiment_path FLAGS...: the folder tune_sweep.py with these flags writes (<storage>/<name>), resolved as
# it resolves them (config, --set, --storage, --quick); nothing is started.
experiment_path() {
  "$py" - "$@" <<'PY'
import sys
from pathlib import Path

import tune_sweep
from apot.config import load_config

a = tune_sweep.parse_args(sys.argv[1:])
cfg = load_config(a.config, overrides=a.overrides, quick=a.quick, storage=a.storage, data_dir=a.data_dir)
print(Path(cfg.storage).resolve() / cfg.name)
PY
}

"""``python -m apot.data``: see `apot.data.cli`."""

import sys

from apot.data.cli import main

sys.exit(main())

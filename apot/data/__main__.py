"""``python -m apot.data``: see `apot.data.cli`."""

import sys

from apot.data.cli import main

if __name__ == "__main__":
    sys.exit(main())

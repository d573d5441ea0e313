"""``python -m weavelet_core``: the ``weavelet`` command line."""

import sys

from weavelet_core.cli import main

if __name__ == "__main__":
    sys.exit(main())

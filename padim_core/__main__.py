"""``python -m padim_core``: see :mod:`padim_core.cli`."""

import sys

from padim_core.cli import main

if __name__ == "__main__":
    sys.exit(main())

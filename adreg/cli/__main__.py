"""``python -m adreg.cli``: the same as the ``adreg`` command."""

import sys

from adreg.cli import main

sys.exit(main())

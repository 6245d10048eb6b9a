"""``python -m convgpt``: the ``convgpt`` command line."""

import sys

from convgpt.cli import main

sys.exit(main())

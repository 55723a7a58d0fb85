"""``python -m rotator``."""

import sys

from rotator.cli.main import main

sys.exit(main())

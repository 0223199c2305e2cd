"""``python -m mmfl`` runs the ``mmfl`` command."""

import sys

from mmfl.cli import main

sys.exit(main())

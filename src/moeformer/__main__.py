"""``python -m moeformer`` runs the command line (torchrun needs a module to launch)."""

import sys

from moeformer.cli import main

sys.exit(main())

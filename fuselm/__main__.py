"""``python -m fuselm`` == the ``fuselm`` console script (used by accelerate/torchrun)."""

import sys

from fuselm.cli import main

sys.exit(main())

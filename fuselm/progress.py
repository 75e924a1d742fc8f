"""Progress bars that help at a terminal and stay out of the way in logs.

Every long loop shows rate and ETA (DESIGN.md principle 10), but a bar that redraws ten
times a second turns a CI log or a cluster job's stdout into megabytes of carriage
returns. So: redraw often on a terminal, every 30 s otherwise, never under ``fuselm -q``.
"""

from __future__ import annotations

import os
import sys
from typing import Any


def progress(**kwargs: Any):
    """A ``tqdm`` bar with fuselm's defaults; keyword arguments go to ``tqdm``."""
    from tqdm.auto import tqdm

    tty = sys.stderr.isatty()
    kwargs.setdefault("mininterval", 0.5 if tty else 30.0)
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("disable", os.environ.get("FUSELM_QUIET") == "1")
    return tqdm(**kwargs)

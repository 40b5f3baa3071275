"""Status lines on stderr that leave open progress bars intact."""
from __future__ import annotations

import sys


def write_line(msg: str) -> None:
    """``msg`` on stderr, through ``tqdm.write`` when tqdm is installed (a plain print would land in the
    middle of an open bar's line)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        print(msg, file=sys.stderr, flush=True)
    else:
        tqdm.write(msg, file=sys.stderr)

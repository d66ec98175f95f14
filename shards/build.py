#!/usr/bin/env python
"""Build WebDataset shards: ``python shards/build.py DATASET [--src DIR] [--out DIR]``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gensuite.data.shards import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

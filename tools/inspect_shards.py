#!/usr/bin/env python
"""Verify WebDataset shards and print their statistics; exits 1 naming each corrupt shard and key.

    python tools/inspect_shards.py "shards/shard-{000000..000099}.tar" --samples 3 --check-sizes
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing

from mmscale.shards.inspection import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

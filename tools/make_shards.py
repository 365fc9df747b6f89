#!/usr/bin/env python
"""Write an image-caption corpus as resumable WebDataset shards; `--help` lists the options.

    python tools/make_shards.py --input images/ --output shards/ --samples-per-shard 10000 --resize 256
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing

from mmscale.shards.make_shards import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Train a BERT-style WordPiece tokenizer on the captions of shards; saves an AutoTokenizer folder.

    python tools/train_tokenizer.py --data shards/ --vocab-size 30522 --output tokenizer/
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing

from mmscale.shards.tokenizer_train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

"""`python -m mmscale.train` / `deepspeed [launcher options] --module mmscale.train --config FILE [key=value ...]`."""

import sys

from mmscale.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))

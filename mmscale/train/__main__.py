"""`python -m mmscale.train` / `deepspeed [launcher options] --module mmscale.train --config FILE [key=value ...]`."""

import sys

from mmscale.cli import exit_without_teardown, main

if __name__ == "__main__":
    exit_without_teardown(main(["train", *sys.argv[1:]]))

"""DeepSpeed ZeRO-3 training: engine setup, the loop, checkpoints and metrics.

`python -m mmscale.train --config FILE [key=value ...]` (what `deepspeed --module mmscale.train`
runs on every rank) and `mmscale train` are the same entry point.
"""

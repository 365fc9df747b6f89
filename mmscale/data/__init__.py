"""Reading shards for training: specs and raw tar reading (`tars`), the streaming loader and its position,
decode + augment, tokenizing and MLM masking. Writing shards is `mmscale.shards`, which this package never
imports."""

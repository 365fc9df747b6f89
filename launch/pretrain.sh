#!/usr/bin/env bash
# One node, every GPU (or NUM_GPUS of them; on a CPU-only machine NUM_GPUS=2 runs 2 gloo ranks):
#   launch/pretrain.sh configs/pretrain/base.yaml data.train='shards/{000000..000999}.tar' tokenizer=tok/ [key=value ...]
set -euo pipefail
config=${1:?usage: launch/pretrain.sh CONFIG [key=value ...]}
shift
exec deepspeed ${NUM_GPUS:+--num_gpus "$NUM_GPUS"} ${MASTER_PORT:+--master_port "$MASTER_PORT"} \
    --module mmscale.train --config "$config" "$@"

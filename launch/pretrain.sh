#!/usr/bin/env bash
# One node, every GPU (or NUM_GPUS of them; on a CPU-only machine NUM_GPUS=2 runs 2 gloo ranks):
#   launch/pretrain.sh configs/pretrain/base.yaml data.train='shards/{000000..000999}.tar' tokenizer=tok/ [key=value ...]
# Only the GPUs in CUDA_VISIBLE_DEVICES are used, when it is set.
set -euo pipefail
config=${1:?usage: launch/pretrain.sh CONFIG [key=value ...]}
shift
devices=()
if [[ -n ${NUM_GPUS:-} ]]; then
    [[ $NUM_GPUS =~ ^[1-9][0-9]*$ ]] || { echo "launch/pretrain.sh: NUM_GPUS=$NUM_GPUS is not a number" >&2; exit 2; }
    devices=(--num_gpus "$NUM_GPUS")
    # --num_gpus N takes GPUs 0..N-1 and drops CUDA_VISIBLE_DEVICES: name its first N instead.
    if [[ ${CUDA_VISIBLE_DEVICES:-} =~ ^[0-9]+(,[0-9]+)*$ ]]; then
        IFS=, read -ra visible <<< "$CUDA_VISIBLE_DEVICES"
        if (( ${#visible[@]} < NUM_GPUS )); then
            echo "launch/pretrain.sh: NUM_GPUS=$NUM_GPUS, but CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES names" \
                 "only ${#visible[@]} GPUs" >&2
            exit 2
        fi
        devices=(--include "localhost:$(IFS=,; echo "${visible[*]:0:NUM_GPUS}")")
    fi
fi
exec deepspeed "${devices[@]}" ${MASTER_PORT:+--master_port "$MASTER_PORT"} \
    --module mmscale.train --config "$config" "$@"

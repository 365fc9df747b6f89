#!/usr/bin/env bash
# Several nodes from one login node, over passwordless ssh (pdsh, the default) or Open MPI:
#   launch/multinode.sh hostfile configs/pretrain/large.yaml [key=value ...]
#   LAUNCHER=openmpi launch/multinode.sh hostfile configs/pretrain/large.yaml
# The hostfile lists one node per line as `name slots=GPUS`. Variables the ranks need (NCCL_*,
# HF_HOME, PYTHONPATH, ...) go in a `.deepspeed_env` file (VAR=value lines) in the directory you
# launch from or in $HOME: the DeepSpeed launcher exports them on every node (see
# launch/deepspeed_env.example). Every node must see the same code, config and data paths.
set -euo pipefail
hostfile=${1:?usage: launch/multinode.sh HOSTFILE CONFIG [key=value ...]}
config=${2:?usage: launch/multinode.sh HOSTFILE CONFIG [key=value ...]}
shift 2
exec deepspeed --hostfile "$hostfile" --launcher "${LAUNCHER:-pdsh}" \
    ${MASTER_ADDR:+--master_addr "$MASTER_ADDR"} ${MASTER_PORT:+--master_port "$MASTER_PORT"} \
    --module mmscale.train --config "$config" "$@"

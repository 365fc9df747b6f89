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
launcher=${LAUNCHER:-pdsh}
# pdsh runs one shell command line on every node, which DeepSpeed joins from the arguments quoting only
# spaces: a `$(...)`, quote or brace in them would be run or expanded there. Those values go in the YAML
# config instead (or use a launcher that passes arguments as they are, such as openmpi).
if [[ ${launcher,,} == pdsh ]]; then
    unsafe='[^A-Za-z0-9_@%+=:,./ -]'
    for value in "$config" "$@" "${MASTER_ADDR:-}" "${MASTER_PORT:-}"; do
        if [[ $value =~ $unsafe ]]; then
            echo "launch/multinode.sh: '$value' holds characters (${BASH_REMATCH[0]}) that the pdsh launcher's" \
                 "remote shell would interpret; put that value in the YAML config, or use LAUNCHER=openmpi" >&2
            exit 2
        fi
    done
fi
exec deepspeed --hostfile "$hostfile" --launcher "$launcher" \
    ${MASTER_ADDR:+--master_addr "$MASTER_ADDR"} ${MASTER_PORT:+--master_port "$MASTER_PORT"} \
    --module mmscale.train --config "$config" "$@"

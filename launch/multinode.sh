#!/usr/bin/env bash
# Several nodes from one login node, over passwordless ssh (pdsh, the default) or Open MPI:
#   launch/multinode.sh hostfile configs/pretrain/large.yaml "data.train=shards/{000000..000999}.tar" [key=value ...]
#   LAUNCHER=openmpi launch/multinode.sh hostfile configs/pretrain/large.yaml
# The hostfile lists one node per line as `name slots=GPUS`. Every node must see the same code, config and
# data paths. Variables the ranks need go in a `.deepspeed_env` file in the directory you launch from or in
# $HOME, which the DeepSpeed launcher exports on every node: copy launch/deepspeed_env.example and edit it.
# DeepSpeed reads each of its lines as VAR=value (no comments, no blank lines). GLOO_SOCKET_IFNAME belongs
# there beside NCCL_SOCKET_IFNAME: gloo carries mmscale's barriers and object gathers, and the pdsh
# launcher passes on only NCCL_*, PYTHON*, UCX_*, MV2_* and MLFLOW_* by itself.
set -euo pipefail
usage="usage: launch/multinode.sh HOSTFILE CONFIG [key=value ...]"
hostfile=${1:?$usage}
: "${2:?$usage}"
shift
launcher=${LAUNCHER:-pdsh}
if [[ ${launcher,,} == pdsh ]]; then
    # pdsh runs one shell command line on every node, which DeepSpeed joins from its arguments: the remote
    # shell would brace-expand a shard spec into several arguments, split `::`-joined paths with spaces and
    # run a `$(...)`. So each argument (the config path too) is quoted for that shell, exactly once:
    # DeepSpeed's PDSHRunner already wraps an argument holding a space in "..." (escaping only its `"`), so
    # those get the rest of double-quote escaping (\ $ `); every other one gets printf %q. pdsh itself
    # replaces %n, %h, %u and %% in the line, hence % -> %%.
    quoted=()
    for value in "$@"; do
        if [[ $value == *' '* ]]; then
            value=${value//\\/\\\\}; value=${value//\$/\\\$}; value=${value//\`/\\\`}
        else
            printf -v value %q "$value"
        fi
        quoted+=("${value//%/%%}")
    done
    set -- "${quoted[@]}"
    # DeepSpeed writes these into the line as they are (`cd DIR;`, --master_addr=ADDR): they must be plain.
    plain='^[A-Za-z0-9_@+=:,./-]*$'
    for name in PWD MASTER_ADDR MASTER_PORT; do
        if [[ ! ${!name:-} =~ $plain ]]; then
            echo "launch/multinode.sh: $name=${!name} holds characters that the pdsh launcher's remote shell would" \
                 "interpret; launch from (or use) a plain name, or use LAUNCHER=openmpi" >&2
            exit 2
        fi
    done
fi
config=$1
shift
launcher_args=()
if [[ ${launcher,,} == openmpi ]]; then
    # mpirun starts every rank itself and DeepSpeed's Open MPI runner exports no rendezvous: the ranks map
    # OMPI_COMM_WORLD_* to RANK/WORLD_SIZE (mmscale.train.engine.launcher_environment) and meet at the first
    # host of the hostfile unless MASTER_ADDR says otherwise.
    master_addr=${MASTER_ADDR:-$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "$hostfile")}
    master_port=${MASTER_PORT:-29500}
    plain='^[A-Za-z0-9_.:-]+$'
    if [[ ! $master_addr =~ $plain || ! $master_port =~ ^[0-9]+$ ]]; then
        echo "launch/multinode.sh: MASTER_ADDR=$master_addr / MASTER_PORT=$master_port is not a plain host and port" >&2
        exit 2
    fi
    launcher_args=(--launcher_args "-x MASTER_ADDR=$master_addr -x MASTER_PORT=$master_port ${LAUNCHER_ARGS:-}")
fi
exec deepspeed --hostfile "$hostfile" --launcher "$launcher" "${launcher_args[@]}" \
    ${MASTER_ADDR:+--master_addr "$MASTER_ADDR"} ${MASTER_PORT:+--master_port "$MASTER_PORT"} \
    --module mmscale.train --config "$config" "$@"

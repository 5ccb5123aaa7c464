#!/bin/bash
# One llmjax.plan run, logged: run.sh NAME CONFIG_ARG TOPOLOGY [overrides...]
cd "$(dirname "$0")/../.."
name=$1; arg=$2; topo=$3; shift 3
log=benchmarks/sft_plan_logs/$name.log
echo "JAX_PLATFORMS=cpu ALLOW_MULTIPLE_LIBTPU_LOAD=1 python -m llmjax.plan --config=experiments/sft.py:$arg --topology=$topo $*" > $log
( JAX_PLATFORMS=cpu ALLOW_MULTIPLE_LIBTPU_LOAD=1 PYTHONPATH=$PWD /usr/bin/time -f 'wall %e s, max RSS %M KiB' \
  /work/main/.venv/bin/python -m llmjax.plan --config=experiments/sft.py:$arg --topology=$topo "$@" ) >> $log 2>&1
echo "rc=$?" >> $log
grep -E "^JAX|topology |^model |arguments|  temp|total|^error|wall|^rc=" $log

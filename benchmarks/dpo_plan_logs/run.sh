#!/bin/bash
# One llmjax.plan run, logged: run.sh NAME EXPERIMENT:ARG TOPOLOGY [overrides...]
# e.g. run.sh dpo8b_full_v5p8 dpo.py:llama3-8b v5p:2x2x1
cd "$(dirname "$0")/../.."
name=$1; arg=$2; topo=$3; shift 3
log=benchmarks/dpo_plan_logs/$name.log
echo "JAX_PLATFORMS=cpu ALLOW_MULTIPLE_LIBTPU_LOAD=1 python -m llmjax.plan --config=experiments/$arg --topology=$topo $*" > $log
( JAX_PLATFORMS=cpu ALLOW_MULTIPLE_LIBTPU_LOAD=1 PYTHONPATH=$PWD /usr/bin/time -f 'wall %e s, max RSS %M KiB' \
  /work/main/.venv/bin/python -m llmjax.plan --config=experiments/$arg --topology=$topo "$@" ) >> $log 2>&1
echo "rc=$?" >> $log
grep -E "^JAX|topology |^model |arguments|of which|reference|  temp|total|^error|wall|^rc=" $log

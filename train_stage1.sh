#!/usr/bin/env bash
# Stage 1 (alignment). GPU cluster: NNODES=4 GPUS_PER_NODE=4 NODE_RANK=<i> MASTER_ADDR=<host> bash train_stage1.sh
# Without a GPU it runs the tiny recipe on the CPU. Arguments: [recipe.yaml] [--resume] [section.key=value ...]
exec bash "$(dirname "${BASH_SOURCE[0]}")/scripts/launch.sh" stage1 "$@"

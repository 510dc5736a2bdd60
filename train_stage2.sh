#!/usr/bin/env bash
# Stage 2 (GRPO). GPU cluster: NNODES=4 GPUS_PER_NODE=4 NODE_RANK=<i> MASTER_ADDR=<host> bash train_stage2.sh
# Other recipes: bash train_stage2.sh configs/recipes/reasonseg.yaml | cot.yaml | lora.yaml
# Without a GPU it runs the tiny recipe on the CPU. Arguments: [recipe.yaml] [--resume] [section.key=value ...]
exec bash "$(dirname "${BASH_SOURCE[0]}")/scripts/launch.sh" stage2 "$@"

"""Training: stage 1 alignment, stage 2 GRPO (TRL), the tiny warm-up, and YAML recipes."""

"""Multi-domain RL on Megatron-Core: GRPO math (algos, losses), the trainer and its components, its configuration
and the `mgs-train` command.

  config      TrainConfig: one section per component; load_config(YAML, overrides); check_paths
  trainer     Trainer (set-up, train_step as named phases, fit), run(cfg)
  policy      the Megatron model, reference, optimizer (+ MGS), loss, the one gradient path, logprobs
  batches     scored rollouts -> advantages -> this rank's domain-pure micro-batches
  scoring     rewards of a step's rollouts, split over ranks
  validation  greedy validation on held-out prompts
  resume      checkpoints (atomic, resumable), preemption
  metrics     per-domain / per-phase / per-module metrics, sinks (JSONL, TensorBoard, W&B), summary table
  warmup      supervised warm-up of the toy job (cached)
  algos       advantage estimators, policy losses, KL estimators (registries), AlgoConfig
  losses      the RL loss on Megatron's vocab-parallel output
  cli         mgs-train
"""

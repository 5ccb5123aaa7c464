"""Online RL: rollouts from the policy with the generation engine on the trainer's mesh,
rewards, and policy-gradient losses through the one train step.

    rewards.py   reward functions (built-in verifiers, user functions by import), checked
    rollout.py   group sampling with per-token log-probs; a rollout as a train batch
    grpo.py      GRPO's advantages and loss (TRL 1.16's formulas, every loss type exact)
    loop.py      sample, score, update; exact resume (`python -m llmjax.main` with
                 train.objective='grpo', experiments/grpo.py)
"""

"""Online RL parts (PPO and GRPO) the recipes compose: prompts, sampling, scoring, rewards, the
objectives and the training-step losses.

    PromptSet, load_prompts                          prompts.py     the prompts and the rows graders read
    sample, sequence_seed                            sampling.py    batched, per-sequence seeded sampling
    ActorCritic, score_tokens, reference_of          policy.py      log-probs, entropy, values, the reference
    generate, score, Rollouts, update_plan           rollouts.py    a step's experience as trainable rows
    RewardFunction, load_reward_model                rewards.py     reward model and grader scores
    gae, masked_whiten, kl_penalized_rewards, ...    objectives.py  the arithmetic, one function each
    PpoLoss, GrpoLoss                                losses.py      the losses as training-step modules
"""

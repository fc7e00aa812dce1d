"""Alignment: the losses, log-probabilities and rollouts shared by the reward-model, preference and RL tasks."""

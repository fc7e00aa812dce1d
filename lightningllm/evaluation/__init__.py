"""Evaluation through lm-evaluation-harness: the model adapter, the bundled Shakespeare tasks, the command."""

"""Built-in judge plugins: scorers of (prompt, response) pairs for AI feedback (``lightningllm label``)."""

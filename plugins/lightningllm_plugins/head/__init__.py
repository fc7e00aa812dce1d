"""Built-in head plugins: what a model computes from its final hidden states."""

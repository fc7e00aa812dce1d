"""Built-in tokenizer plugins."""

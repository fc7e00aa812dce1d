"""Built-in ffn plugins."""

"""Built-in block plugins."""

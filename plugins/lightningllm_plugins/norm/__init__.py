"""Built-in norm plugins."""

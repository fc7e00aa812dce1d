"""Built-in position plugins."""

"""Built-in transform plugins (Freeze is core: lightningllm/transforms.py)."""

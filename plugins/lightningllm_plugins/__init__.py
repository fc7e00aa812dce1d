"""Built-in lightningllm plugins, registered through the `lightningllm.plugins` entry point."""

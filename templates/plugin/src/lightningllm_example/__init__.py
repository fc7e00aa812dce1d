"""An example third-party lightningllm plugin package.

The entry point ``example = "lightningllm_example"`` in ``pyproject.toml`` names this package;
lightningllm imports every module under it, so each ``@register``-decorated class in those modules
becomes available by its class name (``lightningllm plugins`` lists it). Add a plugin by adding a
module: nothing here needs to import it.
"""

__version__ = "0.1.0"

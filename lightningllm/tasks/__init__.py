"""Training objectives as LightningModules; each receives an already-built model."""

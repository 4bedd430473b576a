"""Demo material, as ``lightning.pytorch.demos``: tiny models built from configs, in-memory
tokenizers and synthetic preference tasks. No download."""

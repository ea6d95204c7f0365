"""Training: data sets, configs, the tokenizer and VAR trainers, DDP helpers (imported lazily by the CLI)."""

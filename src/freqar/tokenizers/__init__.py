"""Tokenizers: image <-> per-stage tokens, and the running canvas the engine updates."""

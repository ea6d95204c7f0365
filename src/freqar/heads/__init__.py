"""Per-token prediction heads shared across families (the diffusion MLP of FAR and HART)."""

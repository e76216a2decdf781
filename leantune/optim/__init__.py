"""Low-rank gradient optimizers (GaLore family), per-layer updates and LISA."""

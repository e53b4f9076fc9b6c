"""The bundled model's tooling: the digits data, the small-DiT training, the digit classifier that
stands in for Inception, and the reference batch (assets/README.md says how each asset was made)."""

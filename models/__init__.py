"""Model presets, loading, the latent rollout, projections and the step decoder."""

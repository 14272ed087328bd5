"""One-call integration where users already are: diffusers pipelines (pared.integrations.diffusers)."""

"""One-call integration where users already are: diffusers pipelines (pared.integrations.diffusers)
and transformers models with their tokenizers (pared.integrations.transformers)."""

"""Weights and task vectors: loading models from anywhere, matching names, τ = θ_ft − θ_pre and the head."""

"""Demo assets: deterministic training-data generators for the shipped demo models."""

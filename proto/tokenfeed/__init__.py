"""tokenfeed's wire contract: generated protocol code (``tokenfeed.v1``) and small pure helpers."""

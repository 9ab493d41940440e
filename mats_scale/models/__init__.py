"""Model code: torch, timm and einops only (no distributed or checkpointing imports)."""

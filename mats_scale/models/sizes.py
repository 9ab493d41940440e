"""Model size registry: one place for every ViT shape (DESIGN.md "Model sizes").

All sizes share: fixed 1-D sin-cos position embeddings (the VideoMAE table), q/v-only qkv bias,
LayerNorm eps 1e-6 and a decoder of depth 4 (the tubelet size is a model argument, models/args.py). `debug` is a toy size for tests.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ViTSize:
    embed_dim: int
    depth: int
    num_heads: int
    mlp_dim: int
    patch_size: int
    decoder_dim: int
    decoder_heads: int
    decoder_depth: int = 4

    @property
    def decoder_mlp_dim(self) -> int:
        # VideoMAE V2 builds the decoder with the encoder's mlp_ratio (48/11 for g), truncated as
        # timm does: int(512 * 48 / 11) = 2234 for g, 4 * decoder_dim for the others.
        return int(self.decoder_dim * (self.mlp_dim / self.embed_dim))


SIZES: dict[str, ViTSize] = {
    "debug": ViTSize(
        embed_dim=64,
        depth=2,
        num_heads=2,
        mlp_dim=128,
        patch_size=16,
        decoder_dim=32,
        decoder_heads=2,
        decoder_depth=1,
    ),
    "S": ViTSize(
        embed_dim=384, depth=12, num_heads=6, mlp_dim=1536, patch_size=16, decoder_dim=192, decoder_heads=3
    ),
    "B": ViTSize(
        embed_dim=768, depth=12, num_heads=12, mlp_dim=3072, patch_size=16, decoder_dim=384, decoder_heads=6
    ),
    "L": ViTSize(
        embed_dim=1024, depth=24, num_heads=16, mlp_dim=4096, patch_size=16, decoder_dim=512, decoder_heads=8
    ),
    "H": ViTSize(
        embed_dim=1280, depth=32, num_heads=16, mlp_dim=5120, patch_size=16, decoder_dim=512, decoder_heads=8
    ),
    "g": ViTSize(
        embed_dim=1408, depth=40, num_heads=16, mlp_dim=6144, patch_size=14, decoder_dim=512, decoder_heads=8
    ),
}


def get_size(name: str) -> ViTSize:
    try:
        return SIZES[name]
    except KeyError:
        raise ValueError(f"unknown model size {name!r}; allowed: {', '.join(SIZES)}") from None

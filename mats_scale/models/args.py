"""Model arguments: a torch-free dataclass next to the size registry (torchtitan ``model/args.py``).

The job config's ``model:`` section is this dataclass (``mats_scale.config.Config.model``); the models
are built from it and never import the job config. Derived shapes (patch size of a size, token grid)
are properties, never restated.
"""

from __future__ import annotations

from dataclasses import dataclass

from mats_scale.errors import check_choice, check_positive, fail
from mats_scale.models.sizes import SIZES, ViTSize

# ImageNet statistics used for input normalisation (and undone for the pixel targets).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ModelArgs:
    size: str = "B"
    """Model size from the registry: debug, S, B, L, H, g."""
    num_frames: int = 16
    """Frames per clip fed to the model (T)."""
    img_size: int = 224
    """Square input resolution (H = W)."""
    tubelet_size: int = 2
    """Frames per tubelet (t)."""
    patch_size: int | None = None
    """Spatial patch size p; None takes the size's default (16, or 14 for g)."""
    decoder_depth: int | None = None
    """Decoder blocks; None takes the size's default (4)."""
    drop_path: float = 0.0
    """Stochastic depth rate, linearly increasing over the encoder blocks."""
    attn_impl: str = "sdpa"
    """Attention kernel: sdpa (F.scaled_dot_product_attention) or math (explicit, for tests)."""
    norm_pix_loss: bool = True
    """Normalise pixel targets per patch and channel (VideoMAE); False regresses raw pixels."""

    def __post_init__(self) -> None:
        check_choice("model.size", self.size, list(SIZES))
        check_choice("model.attn_impl", self.attn_impl, ["sdpa", "math"])
        for key in ("num_frames", "img_size", "tubelet_size"):
            check_positive(f"model.{key}", getattr(self, key))
        if self.patch_size is not None:
            check_positive("model.patch_size", self.patch_size)
        if self.decoder_depth is not None:
            check_positive("model.decoder_depth", self.decoder_depth)
        if not 0.0 <= self.drop_path < 1.0:
            fail("model.drop_path", self.drop_path, "must be in [0, 1)")
        if self.num_frames % self.tubelet_size:
            fail(
                "model.num_frames",
                self.num_frames,
                f"must be divisible by model.tubelet_size={self.tubelet_size}",
            )
        if self.img_size % self.patch:
            fail("model.img_size", self.img_size, f"must be divisible by the patch size {self.patch}")

    @property
    def arch(self) -> ViTSize:
        return SIZES[self.size]

    @property
    def patch(self) -> int:
        return self.patch_size if self.patch_size is not None else self.arch.patch_size

    @property
    def decoder_blocks(self) -> int:
        return self.decoder_depth if self.decoder_depth is not None else self.arch.decoder_depth

    @property
    def grid(self) -> tuple[int, int, int]:
        """Token grid (T', H', W') = (T/t, H/p, W/p)."""
        return (
            self.num_frames // self.tubelet_size,
            self.img_size // self.patch,
            self.img_size // self.patch,
        )

    @property
    def num_tokens(self) -> int:
        t, h, w = self.grid
        return t * h * w

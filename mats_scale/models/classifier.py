"""Video classifier for fine-tuning: VideoMAE's fine-tuning ViT, with MATS token selection before it.

Parameter names are those of VideoMAE's ``modeling_finetune.VisionTransformer`` (also VideoMAE V2's and
EVEREST's), so their fine-tuned checkpoints load by identity::

    patch_embed.proj.{weight,bias}
    blocks.N.{norm1,attn.qkv,attn.q_bias,attn.v_bias,attn.proj,norm2,mlp.fc1,mlp.fc2}
    fc_norm.{weight,bias}            head.{weight,bias}

With mean pooling (the recipe of the whole family) the encoder's final ``norm`` is an Identity there, so
it has no parameters here either: a pre-training checkpoint's ``encoder.norm`` is not used. The
position table is VideoMAE's fixed 1-D sin-cos table, a non-persistent buffer rebuilt for any frame
count or resolution; ``learned_pos=True`` makes it a parameter ``pos_embed`` (1, N, D) for checkpoints
that bring a learned table (interpolated on load, :mod:`mats_scale.models.load`).

Shapes::

    video   (B, C, T, H, W)  ImageNet-normalised pixels
    ids     (B, n) int64     tokens the encoder sees (None: all N), e.g. the MATS fine-tuning
                             selection ``finetune_selection(model.motion_scores(video), rho_post)``
    logits  (B, num_classes)

Only the `ids` patches are embedded and run through the blocks, so a selection saves real compute.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mats_scale.masking.motion import embed_motion_scores
from mats_scale.models.args import ModelArgs
from mats_scale.models.layers import (
    Block,
    PatchEmbed3D,
    gather_patches,
    init_vit_module,
    sincos_table,
)
from mats_scale.models.pretrain import NORM_EPS, encoder_blocks
from mats_scale.models.spec import InitMixin, ModelSpec, build_model


class VideoClassifier(InitMixin, nn.Module):
    def __init__(
        self,
        cfg: ModelArgs,
        num_classes: int,
        *,
        head_drop: float = 0.0,
        init_scale: float = 0.001,
        learned_pos: bool = False,
        init_state: dict[str, torch.Tensor] | None = None,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        arch = cfg.arch
        self.tubelet_size, self.patch_size = cfg.tubelet_size, cfg.patch
        self.num_tokens, self.embed_dim = cfg.num_tokens, arch.embed_dim
        self.init_scale = init_scale
        self.patch_embed = PatchEmbed3D(
            in_chans=in_chans, embed_dim=arch.embed_dim, tubelet_size=cfg.tubelet_size, patch_size=cfg.patch
        )
        if learned_pos:
            self.pos_embed = nn.Parameter(torch.empty(1, cfg.num_tokens, arch.embed_dim))
        else:  # fixed sin-cos table (N, D), filled by reset_buffers()
            self.register_buffer("pos_embed", torch.empty(cfg.num_tokens, arch.embed_dim), persistent=False)
        self.blocks = encoder_blocks(cfg)
        self.fc_norm = nn.LayerNorm(arch.embed_dim, eps=NORM_EPS)
        self.fc_dropout = nn.Dropout(head_drop)
        self.head = nn.Linear(arch.embed_dim, num_classes)
        # Weights copied over the random init, module by module (see init_module); a plain attribute,
        # not state: names as in this model (mats_scale.models.load maps a checkpoint onto them).
        self._init_state = init_state
        self._names: dict[int, str] | None = None

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    # ---- initialisation -------------------------------------------------------------------
    @torch.no_grad()
    def reset_buffers(self) -> None:
        if not isinstance(self.pos_embed, nn.Parameter):
            self.pos_embed.copy_(sincos_table(*self.pos_embed.shape, device=self.pos_embed.device))

    @torch.no_grad()
    def init_module(self, m: nn.Module) -> None:
        """VideoMAE fine-tuning init of one module's own parameters (trunc-normal 0.02 linears, head
        scaled by `init_scale`), then the `init_state` tensors of that module, if any."""
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
            if m is self.head:
                m.weight.mul_(self.init_scale)
        else:  # norms, the tubelet conv, q/v biases: as in pre-training
            init_vit_module(m)
        if m is self and isinstance(self.pos_embed, nn.Parameter):
            table = sincos_table(self.num_tokens, self.embed_dim, device=self.pos_embed.device)
            self.pos_embed.copy_(table[None])
        if self._init_state:
            if self._names is None:
                self._names = {id(mod): name for name, mod in self.named_modules()}
            prefix = self._names[id(m)]
            for name, p in m.named_parameters(recurse=False):
                src = self._init_state.get(f"{prefix}.{name}" if prefix else name)
                if src is not None:
                    p.copy_(src.to(p.dtype))

    # ---- forward --------------------------------------------------------------------------
    def motion_scores(self, video: torch.Tensor, score: str = "embed") -> torch.Tensor:
        """MATS motion scores (B, N), no gradient: L2 between the patch embeddings of consecutive tubelets."""
        if score == "embed":
            return embed_motion_scores(self.patch_embed, video)
        from mats_scale.masking.motion import pixel_motion_scores

        return pixel_motion_scores(video, self.tubelet_size, self.patch_size)

    def features(self, video: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Mean-pooled, fc_norm-ed tokens (B, D) of `video` over the tokens `ids` (None: all)."""
        pos = self.pos_embed.reshape(self.num_tokens, self.embed_dim)
        if ids is None:
            x = self.patch_embed(video) + pos.to(video.dtype)  # (B, N, D)
        else:
            patches = gather_patches(video, ids, self.tubelet_size, self.patch_size)  # (B, n, C*t*p*p)
            x = self.patch_embed(patches) + F.embedding(ids, pos).to(patches.dtype)  # (B, n, D)
        for blk in self.blocks:
            x = blk(x)
        return self.fc_norm(x.mean(dim=1))

    def forward(
        self, video: torch.Tensor, ids: torch.Tensor | None = None, pooled: bool = False
    ) -> torch.Tensor:
        """Logits (B, num_classes), or with `pooled` the features before the head (B, D) (a linear
        probe's input; through forward, so sharded engines gather every parameter as usual)."""
        x = self.features(video, ids)
        return x if pooled else self.head(self.fc_dropout(x))


def classifier_spec(
    cfg: ModelArgs,
    num_classes: int,
    *,
    head_drop: float = 0.0,
    learned_pos: bool = False,
    init_state: dict[str, torch.Tensor] | None = None,
) -> ModelSpec:
    """The classifier as the engines see it: encoder blocks (the only block group), patch embedding as
    its own unit (motion scores call it alone)."""
    return ModelSpec(
        name=f"classifier-{cfg.size}",
        build=lambda: VideoClassifier(
            cfg, num_classes, head_drop=head_drop, learned_pos=learned_pos, init_state=init_state
        ),
        block_types=(Block,),
        block_groups=lambda m: {"encoder": m.blocks},
        extra_units=lambda m: [m.patch_embed],
        forward_methods=("motion_scores", "features"),
    )


def build_classifier(
    cfg: ModelArgs, num_classes: int, *, device: torch.device | str | None = None, init: bool = True, **kw
) -> VideoClassifier:
    return build_model(classifier_spec(cfg, num_classes, **kw), device, init=init)

import pytest
import torch
from torch.utils.checkpoint import set_checkpoint_early_stop
from torch.utils.flop_counter import FlopCounterMode

from mats_scale.config import ModelConfig
from mats_scale.data.inmemory import moving_square_clips, normalize
from mats_scale.masking import TokenGrid, tube_masking
from mats_scale.models.pretrain import build_pretrain_model, pretrain_spec
from mats_scale.parallel.checkpointing import apply_activation_checkpointing

CFG = ModelConfig(size="debug", num_frames=8, img_size=64, decoder_depth=2)


def _inputs():
    g = torch.Generator().manual_seed(0)
    video, _ = moving_square_clips(2, CFG.num_frames, CFG.img_size, g)
    return normalize(video), tube_masking(TokenGrid.from_model(CFG), 0.75, 2, g)


def _model(enc_every=0, dec_every=0):
    torch.manual_seed(0)
    return apply_activation_checkpointing(
        build_pretrain_model(CFG), pretrain_spec(CFG), {"encoder": enc_every, "decoder": dec_every}
    )


def _saved_bytes(model, video, sel) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(video, *sel).loss
    loss.backward()
    return total


def _flops(model, video, sel) -> int:
    # Without early stop, recomputation replays each wrapped block's whole forward (with it, the
    # last matmul of a block, whose output backward never needs, is skipped).
    with set_checkpoint_early_stop(False), FlopCounterMode(display=False) as counter:
        model(video, *sel).loss.backward()
    return counter.get_total_flops()


def test_same_loss_and_gradients():
    video, sel = _inputs()
    ref, ckpt = _model(), _model(1, 1)
    a, b = ref(video, *sel).loss, ckpt(video, *sel).loss
    a.backward()
    b.backward()
    assert a.item() == pytest.approx(b.item(), abs=1e-6)
    ref_grads = dict(ref.named_parameters())
    for name, p in ckpt.named_parameters():
        name = name.replace("._checkpoint_wrapped_module", "")
        torch.testing.assert_close(p.grad, ref_grads[name].grad, atol=1e-6, rtol=1e-5, msg=name)


def test_state_dict_keys_unchanged():
    assert list(_model(1, 1).state_dict()) == list(_model().state_dict())


def test_fewer_saved_activations_and_recompute_in_flop_count():
    video, sel = _inputs()
    base_bytes = _saved_bytes(_model(), video, sel)
    enc_bytes = _saved_bytes(_model(1, 0), video, sel)
    all_bytes = _saved_bytes(_model(1, 1), video, sel)
    assert all_bytes < enc_bytes < base_bytes

    base, every, half = (
        _flops(_model(), video, sel),
        _flops(_model(1, 1), video, sel),
        _flops(_model(2, 2), video, sel),
    )
    # Recomputation adds exactly one forward of the wrapped blocks: measure that forward directly.
    model = _model()
    assert every > half > base
    enc_blocks = CFG.arch.depth
    x = torch.randn(2, sel.visible_ids.shape[1], CFG.arch.embed_dim)
    with torch.no_grad(), FlopCounterMode(display=False) as blk:
        model.encoder.blocks[0](x)
    y = torch.randn(2, sel.visible_ids.shape[1] + sel.target_ids.shape[1], CFG.arch.decoder_dim)
    with torch.no_grad(), FlopCounterMode(display=False) as dblk:
        model.decoder.blocks[0](y)
    expected_extra = enc_blocks * blk.get_total_flops() + 2 * dblk.get_total_flops()
    assert every - base == expected_extra
    assert half - base == blk.get_total_flops() + dblk.get_total_flops()  # blocks 0 of each stack

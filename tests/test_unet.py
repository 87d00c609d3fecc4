import pytest
import torch

from nanosd.unet import UNet, UNetConfig

BASE = dict(model_channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_levels=[1], num_heads=2)


@pytest.mark.parametrize("options, size", [
    ({}, 8),
    ({"channel_mult": [1, 2, 2], "attention_levels": [2]}, 16),
    ({"channel_mult": [1, 1, 2, 2], "attention_levels": [], "num_res_blocks": 2}, 16),
    ({"attention_levels": [0, 1], "transformer_depth": 2, "num_heads": 4}, 8),
    ({"dropout": 0.1}, 8),
    ({"in_channels": 4}, 8),
    ({"in_channels": 3}, 12),
])
def test_output_shape_equals_input_shape(options, size):
    cfg = UNetConfig(**{**BASE, **options})
    x = torch.randn(2, cfg.in_channels, size, size)
    assert UNet(cfg)(x, torch.tensor([3, 999])).shape == x.shape


def test_conditions_context_labels_and_concatenated_channels():
    cfg = UNetConfig(**{**BASE, "in_channels": 4, "cond_channels": 5, "context_dim": 24, "num_classes": 10})
    net = UNet(cfg)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([1, 500])
    ctx, y, cat = torch.randn(2, 7, 24), torch.tensor([3, 4]), torch.randn(2, 5, 8, 8)
    out = net(x, t, context=ctx, y=y, concat=cat, context_mask=torch.tensor([[1] * 7, [1] * 3 + [0] * 4]))
    assert out.shape == x.shape
    with torch.no_grad():  # zero-initialised output layers hide every condition: give them weights
        for p in net.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(std=0.1)
    a = net(x, t, context=ctx, y=y, concat=cat)
    assert not torch.allclose(a, net(x, t, context=ctx * 2, y=y, concat=cat))
    assert not torch.allclose(a, net(x, t, context=ctx, y=torch.tensor([5, 6]), concat=cat))
    assert not torch.allclose(a, net(x, t, context=ctx, y=y, concat=cat + 1))
    with pytest.raises(ValueError, match="expects 5 concatenated condition channels"):
        net(x, t, context=ctx, y=y)


def test_parameter_names_follow_the_sd_v1_checkpoint():
    names = set(UNet(UNetConfig(**{**BASE, "context_dim": 16})).state_dict())
    for key in ["time_embed.0.weight", "time_embed.2.weight", "input_blocks.0.0.weight",
                "input_blocks.1.0.in_layers.2.weight", "input_blocks.1.0.emb_layers.1.weight",
                "input_blocks.2.0.op.weight", "input_blocks.3.1.proj_in.weight",
                "input_blocks.3.1.transformer_blocks.0.attn2.to_k.weight",
                "input_blocks.3.1.transformer_blocks.0.ff.net.0.proj.weight", "middle_block.1.norm.weight",
                "middle_block.2.out_layers.3.weight", "output_blocks.1.0.skip_connection.weight",
                "output_blocks.1.2.conv.weight", "out.2.weight"]:
        assert key in names, key


def test_sizes_the_unet_cannot_divide_are_refused_with_the_factor():
    net = UNet(UNetConfig(**{**BASE, "channel_mult": [1, 2, 2]}))
    with pytest.raises(ValueError, match="not divisible by the U-Net's factor 4"):
        net(torch.randn(1, 1, 10, 10), torch.tensor([1]))
    with pytest.raises(ValueError, match="multiple of norm_groups=32"):
        UNet(UNetConfig(**{**BASE, "model_channels": 24}))

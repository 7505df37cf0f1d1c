"""The models/ feature adapter: described shapes before training equal the shapes of a real forward."""
import pytest
import timm
import torch

import models  # noqa: F401
from models.features import FeatureAdapter, FeatureRequest, to_map, to_tokens

SMALL = {
    # (timm name, constructor kwargs that shrink it without changing its family's layout)
    'resnet18': ('resnet18', {}),
    'vit': ('deit_tiny_patch16_224', dict(depth=12, embed_dim=48, num_heads=2)),
    'swin': ('swin_tiny_patch4_window7_224', dict(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 1, 2, 2))),
    'mixer': ('MlpMixer', dict(patch_size=16, embed_dim=32, num_blocks=8)),
    'mobilenetv2': ('mobilenetv2_050', {}),
    'convnext': ('convnext_atto', {}),
}

# expected per stage at 224 px: (channels, grid side)
EXPECTED_224 = {
    'resnet18': [(64, 56), (128, 28), (256, 14), (512, 7)],
    'vit': [(48, 14)] * 4,
    'swin': [(16, 56), (32, 28), (64, 14), (128, 7)],
    'mixer': [(32, 14)] * 4,
    'mobilenetv2': [(16, 56), (16, 28), (48, 14), (1280, 7)],
    'convnext': [(40, 56), (80, 28), (160, 14), (320, 7)],
}
LAYOUT = {'resnet18': 'map', 'vit': 'tokens', 'swin': 'tokens', 'mixer': 'tokens', 'mobilenetv2': 'map',
          'convnext': 'map'}


def build(key, size):
    name, kwargs = SMALL[key]
    if key in ('vit', 'swin', 'mixer'):
        kwargs = dict(kwargs, img_size=size)
    torch.manual_seed(0)
    if name == 'MlpMixer':  # timm's mixer entrypoints fix embed_dim, so the class is built directly
        from timm.models.mlp_mixer import MlpMixer
        return MlpMixer(num_classes=7, **kwargs).eval()
    return timm.create_model(name, num_classes=7, **kwargs).eval()


@pytest.mark.parametrize('key', list(SMALL))
def test_description_at_224(key):
    model = build(key, 224)
    d = FeatureAdapter(model, (3, 224, 224)).description
    assert d.layout == LAYOUT[key]
    assert [(t.channels, t.grid) for t in d.stages.values()] == [(c, (g, g)) for c, g in EXPECTED_224[key]]
    assert d.num_classes == 7
    assert d.plain_tokens == (key in ('vit', 'mixer'))
    assert d.num_prefix_tokens == (1 if key == 'vit' else 0)


@pytest.mark.parametrize('key', list(SMALL))
@pytest.mark.parametrize('size', [224, 96])
def test_forward_matches_description(key, size):
    model = build(key, size)
    adapter = FeatureAdapter(model, (3, size, size))
    d = adapter.description
    x = torch.randn(2, 3, size, size)
    out = adapter(x, FeatureRequest(stages=(1, 2, 3, 4, -1), final=True, pre_logits=True))
    for s, tap in d.stages.items():
        assert tuple(out.stages[s].shape) == (2, tap.channels, *tap.grid), (key, s)
    assert torch.equal(out.stages[-1], out.stages[d.num_stages])
    assert tuple(out.final.shape) == (2, d.final.channels, *d.final.grid)
    assert tuple(out.pre_logits.shape) == (2, d.pre_logits_dim)
    # the adapter's logits are the model's own
    with torch.no_grad():
        assert torch.allclose(out.logits, model(x), atol=1e-5)
    # grids shrink with the input: stride 32 (or 16 for plain token models) at any size
    assert d.final.grid == ((size // 16, size // 16) if d.plain_tokens else (-(-size // 32), -(-size // 32)))


def test_map_model_last_stage_is_forward_features():
    model = build('mobilenetv2', 96)
    x = torch.randn(1, 3, 96, 96)
    out = FeatureAdapter(model, (3, 96, 96))(x, FeatureRequest(stages=(3, 4)))
    with torch.no_grad():
        ref = model.forward_features(x)
    assert ref.shape[1] == 1280  # the head conv 320 -> 1280 belongs to the last stage
    assert torch.allclose(out.stages[4], ref, atol=1e-6)


def test_token_models_stage_taps_are_raw_and_final_is_normalized():
    model = build('vit', 64)
    adapter = FeatureAdapter(model, (3, 64, 64))
    x = torch.randn(2, 3, 64, 64)
    out = adapter(x, FeatureRequest(stages=(4,), final=True, prefix_tokens=True))
    with torch.no_grad():
        tokens = model.forward_features(x)  # (B, 1 + N, C) after the final norm
    assert torch.allclose(to_tokens(out.final), tokens[:, 1:], atol=1e-6)
    assert torch.allclose(model.norm(to_tokens(out.stages[4])), tokens[:, 1:], atol=1e-5)
    assert out.prefix[4].shape == (2, 1, 48)


def test_blocks_of_plain_token_models():
    model = build('vit', 64)
    adapter = FeatureAdapter(model, (3, 64, 64))
    out = adapter(torch.randn(2, 3, 64, 64), FeatureRequest(blocks=(0, 1)))
    assert set(out.blocks) == {0, 1} and out.blocks[0].shape == (2, 48, 4, 4)
    assert not torch.equal(out.blocks[0], out.blocks[1])
    with pytest.raises(ValueError, match='hierarchical'):
        FeatureAdapter(build('resnet18', 64), (3, 64, 64)).check(FeatureRequest(blocks=(0,)))


def test_shallow_token_model_has_distinct_stages():
    model = timm.create_model('test_vit', img_size=32)  # 6 blocks
    d = FeatureAdapter(model, (3, 32, 32)).description
    assert [t.index for t in d.stages.values()] == [1, 2, 4, 5]


def test_stage_errors_and_negative_indices():
    d = FeatureAdapter(timm.create_model('resnet20', num_classes=10), (3, 32, 32)).description
    assert d.num_stages == 3 and d.resolve_stage(-1) == 3 and d.resolve_stage(-2) == 2
    with pytest.raises(ValueError, match=r'stage 4 does not exist: this model has stages 1\.\.3'):
        d.resolve_stage(4)


def test_token_map_round_trip():
    x = torch.randn(2, 5, 3, 4)
    tokens = to_tokens(x)
    assert tokens.shape == (2, 12, 5)
    assert torch.equal(tokens[:, 1 * 4 + 2], x[:, :, 1, 2])  # raster order: r = h * W + w
    assert torch.equal(to_map(tokens, (3, 4)), x)

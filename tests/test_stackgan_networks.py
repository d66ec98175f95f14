"""StackGAN networks: the authors' parameter counts and state_dict layout, the fused up-block, ICNR,
paired discriminator BatchNorm and output shapes.

Reference numbers come from instantiating the authors' StackGAN-Pytorch model.py with the birds
settings (TEXT.DIMENSION 1024, CONDITION_DIM 128, Z_DIM 100, GF_DIM 128, DF_DIM 64, R_NUM 4); the
original code is not needed offline, so the counts and key digests are written here.
"""

import copy
import hashlib

import pytest
import torch
import torch.nn.functional as F

from gensuite.families.stackgan.networks import (NearestUpConv2d, Stage1Discriminator, Stage1Generator,
                                                 Stage2Discriminator, Stage2Generator, count_parameters,
                                                 init_weights, up_block)
from gensuite.trainer import architecture_text

TEXT_DIM, C_DIM, Z_DIM, GF_DIM, DF_DIM = 1024, 128, 100, 128, 64


def paper_networks() -> dict:
    """Birds-setting networks on the meta device: shapes and counts without allocating 110M floats."""
    with torch.device("meta"):
        return {"STAGE1_G": Stage1Generator(Z_DIM, C_DIM, TEXT_DIM, GF_DIM),
                "STAGE1_D": Stage1Discriminator(C_DIM, DF_DIM, 64),
                "STAGE2_G": Stage2Generator(C_DIM, TEXT_DIM, GF_DIM),
                "STAGE2_D": Stage2Discriminator(C_DIM, DF_DIM, 256)}


def test_parameter_counts_equal_the_original():
    counts = {name: count_parameters(net) for name, net in paper_networks().items()}
    assert counts["STAGE1_G"] == 10_301_248
    assert counts["STAGE1_D"] == 5_715_713
    assert counts["STAGE2_G"] == 26_290_080  # the original STAGE2_G holds the frozen Stage I too:
    assert counts["STAGE2_G"] + counts["STAGE1_G"] == 36_591_328
    assert counts["STAGE2_D"] == 71_269_122


# sha256 over the sorted lines "key (shape)" of the original's state_dicts; STAGE2_G without `STAGE1_G.`
ORIGINAL_STATE_DICTS = {
    "STAGE1_G": (33, "5a194226287f1eed3569ca9a35af9a95e359a1a84d72b09907f0c6f46f32525f"),
    "STAGE1_D": (27, "f65f7cb06b009a33e74e23d22521aaedd947b96c13ff8172cad7ad875a068e74"),
    "STAGE2_G": (94, "036b65524e8c5f7990152d92a39671f0074bd51cf24127a120578a5cfd7d9bb4"),
    "STAGE2_D": (53, "040086c5411db13e8e5b80a950d5ab2d5b21f2e1fb09b0a9055cf9468a3d061f"),
}
SPOT_KEYS = {
    "STAGE1_G": {"ca_net.fc.weight": (256, 1024), "fc.0.weight": (16384, 228),
                 "upsample1.1.weight": (512, 1024, 3, 3), "upsample4.2.running_var": (64,),
                 "img.0.weight": (3, 64, 3, 3)},
    "STAGE1_D": {"encode_img.0.weight": (64, 3, 4, 4), "encode_img.9.running_mean": (512,),
                 "get_cond_logits.outlogits.0.weight": (512, 640, 3, 3),
                 "get_cond_logits.outlogits.3.bias": (1,)},
    "STAGE2_G": {"encoder.5.weight": (512, 256, 4, 4), "hr_joint.0.weight": (512, 640, 3, 3),
                 "residual.3.block.4.running_var": (512,), "upsample4.1.weight": (32, 64, 3, 3)},
    "STAGE2_D": {"encode_img.20.weight": (512, 1024, 3, 3), "get_cond_logits.outlogits.0.weight": (512, 640, 3, 3),
                 "get_uncond_logits.outlogits.0.bias": (1,)},
}


@pytest.mark.parametrize("name", sorted(ORIGINAL_STATE_DICTS))
def test_state_dict_layout_equals_the_original(name):
    state = paper_networks()[name].state_dict()
    for key, shape in SPOT_KEYS[name].items():
        assert tuple(state[key].shape) == shape, key
    lines = "\n".join(f"{key} {tuple(value.shape)}" for key, value in sorted(state.items()))
    assert (len(state), hashlib.sha256(lines.encode()).hexdigest()) == ORIGINAL_STATE_DICTS[name], lines


def nearest_then_conv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), weight, padding=1)


@pytest.mark.parametrize("height, width", [(1, 1), (2, 3), (5, 4), (7, 7)])
def test_fused_nearest_conv_equals_upsample_then_conv(height, width):
    torch.manual_seed(0)
    fused = NearestUpConv2d(5, 6).double()
    x = torch.randn(3, 5, height, width, dtype=torch.float64, requires_grad=True)
    out = fused(x)
    ref = nearest_then_conv(x, fused.weight)
    assert out.shape == ref.shape == (3, 6, 2 * height, 2 * width)
    assert torch.allclose(out, ref, atol=1e-12, rtol=0)  # borders included
    grads = torch.autograd.grad(out.square().sum(), (x, fused.weight))
    ref_grads = torch.autograd.grad(ref.square().sum(), (x, fused.weight))
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, atol=1e-10, rtol=0)


def test_fused_kernel_is_a_w_at():
    a = torch.tensor([[0, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0]], dtype=torch.float64)
    fused = NearestUpConv2d(4, 2).double()
    expected = torch.einsum("pk,oikl,ql->iopq", a, fused.weight, a)  # (in, out, 4, 4) for conv_transpose2d
    assert torch.allclose(fused.transposed_kernel(), expected, atol=1e-15)


def test_fused_up_block_float32_and_channels_last():
    torch.manual_seed(0)
    fused = NearestUpConv2d(16, 8)
    x = torch.randn(2, 16, 9, 6)
    ref = nearest_then_conv(x, fused.weight)
    assert (fused(x) - ref).abs().max() < 1e-5
    fused_cl = copy.deepcopy(fused).to(memory_format=torch.channels_last)
    out_cl = fused_cl(x.contiguous(memory_format=torch.channels_last))
    assert (out_cl - ref).abs().max() < 1e-5


def test_pixelshuffle_icnr_starts_as_nearest_upsampling():
    torch.manual_seed(0)
    block = up_block(64, 32, "pixelshuffle")
    init_weights(block)
    conv, shuffle = block[0], block[1]
    x = torch.randn(2, 64, 5, 5)
    one_filter_per_group = conv.weight[::4]
    assert torch.equal(conv.weight, one_filter_per_group.repeat_interleave(4, dim=0))
    out = shuffle(conv(x))
    assert torch.allclose(out, F.interpolate(F.conv2d(x, one_filter_per_group, padding=1), scale_factor=2),
                          atol=1e-6)
    assert abs(conv.weight.std().item() - 0.02) < 0.002 and abs(conv.weight.mean().item()) < 0.002


def test_networks_initialise_pixelshuffle_with_icnr():
    generator = Stage1Generator(Z_DIM, C_DIM, TEXT_DIM, 32, upsamples=2, upsample="pixelshuffle")
    for block in (generator.upsample1, generator.upsample2):
        weight = block[0].weight
        assert torch.equal(weight, weight[::4].repeat_interleave(4, dim=0))
    assert abs(generator.fc[1].weight.mean().item() - 1.0) < 0.01  # BatchNorm scale N(1, 0.02)


@pytest.mark.parametrize("make, size", [(lambda: Stage1Discriminator(C_DIM, 16, 16), 16),
                                        (lambda: Stage2Discriminator(C_DIM, 8, 64), 64)])
def test_paired_features_equal_separate_calls(make, size):
    torch.manual_seed(0)
    separate = make()
    paired = copy.deepcopy(separate)
    real, fake = torch.randn(4, 3, size, size), 0.5 * torch.randn(4, 3, size, size) + 0.3
    c = torch.randn(4, C_DIM)

    real_f, fake_f = separate.features(real), separate.features(fake)
    logits = torch.cat([separate.cond_logits(real_f, c), separate.cond_logits(real_f[:-1], c[1:]),
                        separate.cond_logits(fake_f, c)])  # the original's order: real, wrong, fake

    both = paired.features(torch.cat([real, fake]), groups=2)
    paired_logits = paired.cond_logits(torch.cat([both[:4], both[:3], both[4:]]), torch.cat([c, c[1:], c]),
                                       groups=(4, 3, 4))
    assert torch.allclose(both, torch.cat([real_f, fake_f]), atol=1e-6, rtol=0)
    assert torch.allclose(paired_logits, logits, atol=1e-6, rtol=0)
    for (name, a), (_, b) in zip(separate.named_buffers(), paired.named_buffers()):
        assert torch.allclose(a.double(), b.double(), atol=1e-6, rtol=0), name

    paired.eval()  # running statistics: grouping changes nothing
    assert torch.allclose(paired.features(torch.cat([real, fake]), groups=2),
                          torch.cat([paired.features(real), paired.features(fake)]), atol=1e-6)
    with pytest.raises(ValueError):
        make().features(torch.randn(3, 3, size, size), groups=2)


def test_paper_shapes():
    nets = paper_networks()
    with torch.device("meta"):
        z, embedding = torch.randn(2, Z_DIM), torch.randn(2, TEXT_DIM)
        low, mu, logvar = nets["STAGE1_G"](z, embedding)
        assert low.shape == (2, 3, 64, 64) and mu.shape == logvar.shape == (2, C_DIM)
        assert nets["STAGE1_G"].out_size == 64
        features = nets["STAGE1_D"].features(low)
        assert features.shape == (2, 512, 4, 4) and nets["STAGE1_D"].cond_logits(features, mu).shape == (2,)
        assert nets["STAGE1_D"].uncond_logits is None
        high, mu, _ = nets["STAGE2_G"](low, embedding)
        assert high.shape == (2, 3, 256, 256)
        features = nets["STAGE2_D"].features(high)
        assert features.shape == (2, 512, 4, 4)
        assert nets["STAGE2_D"].cond_logits(features, mu).shape == (2,)
        assert nets["STAGE2_D"].uncond_logits(features).shape == (2,)


def small_networks(**kwargs) -> tuple:
    torch.manual_seed(0)
    return (Stage1Generator(Z_DIM, C_DIM, TEXT_DIM, 32, upsamples=2, **kwargs), Stage1Discriminator(C_DIM, 16, 16),
            Stage2Generator(C_DIM, TEXT_DIM, 32, res_blocks=2, **kwargs), Stage2Discriminator(C_DIM, 16, 64))


@pytest.mark.parametrize("upsample", ["nearest_conv", "pixelshuffle"])
def test_small_shapes_and_ranges(upsample):
    g1, d1, g2, d2 = small_networks(upsample=upsample)
    z, embedding = torch.randn(3, Z_DIM), torch.randn(3, TEXT_DIM)
    low, mu, _ = g1(z, embedding)
    assert low.shape == (3, 3, 16, 16) and g1.out_size == 16 and low.abs().max() <= 1
    assert d1.cond_logits(d1.features(low), mu).shape == (3,)
    high, mu, _ = g2(low, embedding)
    assert high.shape == (3, 3, 64, 64) and high.abs().max() <= 1
    features = d2.features(high)
    assert features.shape == (3, 128, 4, 4) and d2.uncond_logits(features).shape == (3,)


def test_residual_refinement_starts_from_the_upsampled_stage1_image():
    """refine: residual adds the last conv's output to atanh(upsampled Stage-I image) before the tanh:
    with that conv zeroed, Stage II returns the bilinear upsampling of its input exactly; the paper's
    full refinement does not, and both have the same parameters."""
    torch.manual_seed(0)
    full = Stage2Generator(C_DIM, TEXT_DIM, 32, res_blocks=1)
    residual = Stage2Generator(C_DIM, TEXT_DIM, 32, res_blocks=1, refine="residual")
    assert sum(p.numel() for p in full.parameters()) == sum(p.numel() for p in residual.parameters())
    low = torch.rand(2, 3, 16, 16) * 1.6 - 0.8
    embedding = torch.randn(2, TEXT_DIM)
    expected = F.interpolate(low, size=(64, 64), mode="bilinear", align_corners=False)
    for net in (full, residual):
        torch.nn.init.zeros_(net.img[0].weight)
    full.eval(), residual.eval()
    assert torch.allclose(residual(low, embedding)[0], expected, atol=1e-6)
    assert full(low, embedding)[0].abs().max() == 0
    torch.nn.init.normal_(residual.img[0].weight, 0.0, 0.02)
    moved = residual(low, embedding)[0]
    assert 1e-5 < (moved - expected).abs().mean() < 1e-2  # the N(0, 0.02) init: a small correction


def test_channels_last_and_bf16_autocast_forward():
    g1, d1, g2, d2 = small_networks()
    z, embedding = torch.randn(4, Z_DIM), torch.randn(4, TEXT_DIM)
    torch.manual_seed(1)
    low, mu, _ = g1(z, embedding)
    high, _, _ = g2(low, embedding)
    logits = d2.cond_logits(d2.features(high), mu)
    for net in (g1, d1, g2, d2):
        net.to(memory_format=torch.channels_last)
    torch.manual_seed(1)
    low_cl, mu_cl, _ = g1(z, embedding)
    high_cl, _, _ = g2(low_cl.contiguous(memory_format=torch.channels_last), embedding)
    assert (high_cl - high).abs().max() < 1e-4
    assert (d2.cond_logits(d2.features(high_cl), mu_cl) - logits).abs().max() < 1e-3
    with torch.autocast("cpu", torch.bfloat16):
        low_bf16, mu_bf16, _ = g1(z, embedding)
        features = d1.features(torch.cat([low_bf16, low_bf16]), groups=2)
        assert d1.cond_logits(features, torch.cat([mu_bf16, mu_bf16]), groups=2).isfinite().all()


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError):
        Stage1Discriminator(C_DIM, 8, 48)
    with pytest.raises(ValueError):
        Stage2Discriminator(C_DIM, 8, 8)
    with pytest.raises(ValueError):
        up_block(8, 4, "bilinear")
    with pytest.raises(ValueError, match="refine"):
        Stage2Generator(C_DIM, TEXT_DIM, 8, refine="residuals")


def test_discriminator_widths_generalise():
    assert [m.out_channels for m in Stage1Discriminator(C_DIM, 4, 16).encode_img if hasattr(m, "out_channels")] \
        == [16, 32]
    assert [m.out_channels for m in Stage1Discriminator(C_DIM, 4, 128).encode_img if hasattr(m, "out_channels")] \
        == [4, 4, 8, 16, 32]
    assert [m.out_channels for m in Stage2Discriminator(C_DIM, 4, 128).encode_img if hasattr(m, "out_channels")] \
        == [4, 8, 16, 32, 64, 32]
    assert [m.out_channels for m in Stage2Discriminator(C_DIM, 4, 16).encode_img if hasattr(m, "out_channels")] \
        == [16, 32]


def test_architecture_and_counts():
    g1, d1, _, _ = small_networks()
    text = architecture_text({"G": g1, "D": d1}, {})  # what the trainer writes to architecture.txt
    assert f"G: Stage1Generator, {count_parameters(g1):,} parameters" in text
    assert "NearestUpConv2d" in text and "total:" in text
    for p in g1.parameters():
        p.requires_grad_(False)
    assert count_parameters(g1, trainable_only=True) == 0 < count_parameters(g1)


def test_conditioning_augmentation_activations():
    """relu (StackGAN-Pytorch) keeps mu, logvar >= 0, so the code's noise is at least unit scale;
    leaky_relu (the TensorFlow original) lets logvar go negative; same parameters either way."""
    from gensuite.families.stackgan.networks import ConditioningAugmentation

    torch.manual_seed(0)
    relu, leaky = ConditioningAugmentation(6, 3), ConditioningAugmentation(6, 3, "leaky_relu")
    leaky.load_state_dict(relu.state_dict())
    e = torch.randn(64, 6) * 5
    _, mu, logvar = relu(e)
    assert mu.min() >= 0 and logvar.min() >= 0
    _, mu2, logvar2 = leaky(e)
    pre = relu.fc(e)
    assert torch.allclose(torch.cat([mu2, logvar2], 1), torch.where(pre > 0, pre, 0.2 * pre), atol=1e-6)
    assert logvar2.min() < 0
    with pytest.raises(ValueError, match="activation"):
        ConditioningAugmentation(6, 3, "tanh")

"""The UNet presets: released-checkpoint compatibility, attention semantics, a tiny model that learns."""
import json
from pathlib import Path

import pytest
import torch

from rcdm.diffusion.gaussian import create_diffusion
from rcdm.presets import PRESETS, build_unet
from rcdm.unet import AttentionBlock, timestep_embedding

# A copy of shared/reference/rcdm128_state_dict_shapes.json: produced by instantiating the official model.
REFERENCE = Path(__file__).parent / "data" / "rcdm128_state_dict_shapes.json"


@pytest.mark.parametrize("variant", ["trunk_2048", "head_vicreg_8192", "head_simclr_128", "head_dino_256"])
def test_adm128_state_dict_equals_the_official_one(variant):
    ref = json.loads(REFERENCE.read_text())[variant]
    with torch.device("meta"):  # shapes only: no 1.7 GB of memory per variant
        model = build_unet("adm128", ref["ssl_emb.weight"][1])
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert list(ours) == list(ref)  # same names in the same order
    assert ours == ref
    if variant == "trunk_2048":
        assert sum(p.numel() for p in model.parameters()) == pytest.approx(422.6e6, rel=1e-3)


def test_preset_registry():
    assert set(PRESETS) == {"tiny", "adm64", "adm128", "adm256"}
    tiny = build_unet("tiny", 128)
    assert sum(p.numel() for p in tiny.parameters()) <= 2_000_000
    with pytest.raises(KeyError, match="adm128.*tiny"):
        build_unet("adm512", 128)


def _naive_attention(qkv: torch.Tensor, heads: int, legacy: bool) -> torch.Tensor:
    """softmax(q.k / sqrt(ch)) v per head, written out with einsum; qkv [B, 3C, L] -> [B, C, L]."""
    b, c3, length = qkv.shape
    ch = c3 // 3 // heads
    if legacy:
        q, k, v = qkv.reshape(b * heads, 3 * ch, length).split(ch, dim=1)
    else:
        q, k, v = (t.reshape(b * heads, ch, length) for t in qkv.chunk(3, dim=1))
    w = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / ch ** 0.5, dim=-1)
    return torch.einsum("bts,bcs->bct", w, v).reshape(b, -1, length)


@pytest.mark.parametrize("legacy", [True, False])
def test_sdpa_attention_computes_the_per_head_softmax_of_its_qkv_layout(legacy):
    torch.manual_seed(0)
    block = AttentionBlock(64, num_heads=4, num_head_channels=-1, legacy_order=legacy)
    torch.nn.init.normal_(block.proj_out.weight)
    x = torch.randn(2, 64, 4, 4)
    qkv = block.qkv(block.norm(x.reshape(2, 64, -1)))
    want = x.reshape(2, 64, -1) + block.proj_out(_naive_attention(qkv, 4, legacy))
    assert torch.allclose(block(x), want.reshape(2, 64, 4, 4), atol=1e-5)


def test_timestep_embedding_is_cos_then_sin():
    emb = timestep_embedding(torch.tensor([0.0, 5.0]), 8)
    assert emb.shape == (2, 8)
    assert torch.equal(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    assert emb[1, 0].item() == pytest.approx(torch.cos(torch.tensor(5.0)).item())


def test_conditioning_changes_the_output():
    torch.manual_seed(0)
    model = build_unet("tiny", 16)
    for p in model.parameters():  # leave the zero-initialised start, where the output ignores everything
        torch.nn.init.normal_(p, std=0.05)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([10, 10])
    out = model(x, t, torch.zeros(2, 16))
    assert out.shape == (2, 6, 32, 32)
    assert not torch.allclose(out, model(x, t, torch.ones(2, 16)))


@pytest.mark.slow
def test_tiny_model_learns_a_handful_of_images():
    torch.manual_seed(0)
    # four flat-colour images with a square, each with its own conditioning vector
    images = torch.full((4, 3, 32, 32), -0.8)
    for i, colour in enumerate([(1, -1, -1), (-1, 1, -1), (-1, -1, 1), (1, 1, -1)]):
        images[i, :, 8 + 2 * i:20 + 2 * i, 8:20] = torch.tensor(colour, dtype=torch.float)[:, None, None]
    cond = torch.randn(4, 16)
    model = build_unet("tiny", 16)
    diffusion = create_diffusion("linear", 1000)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(1)
    t_eval = torch.randint(0, 1000, (64,), generator=g)
    noise_eval = torch.randn(64, 3, 32, 32, generator=g)
    idx_eval = torch.arange(64) % 4

    def eval_mse() -> float:
        with torch.no_grad():
            return diffusion.training_losses(model, images[idx_eval], t_eval, cond[idx_eval], noise_eval)["mse"].mean().item()

    before = eval_mse()
    for _ in range(120):
        idx = torch.randint(0, 4, (8,))
        loss = diffusion.training_losses(model, images[idx], torch.randint(0, 1000, (8,)), cond[idx])["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_mse()
    assert after < 0.5 * before, (before, after)

"""The diffusion formulas, each checked against an independent derivation."""
import math

import pytest
import torch
from scipy.stats import norm

from rcdm.diffusion.gaussian import GaussianDiffusion, create_diffusion
from rcdm.diffusion.likelihood import discretized_gaussian_log_likelihood, quartile_means
from rcdm.diffusion.schedules import get_betas, space_timesteps


@pytest.fixture(scope="module")
def diff():
    return create_diffusion("linear", 1000)


def test_linear_and_cosine_schedules():
    lin = get_betas("linear", 1000)
    assert lin[0].item() == pytest.approx(1e-4) and lin[-1].item() == pytest.approx(0.02)
    cos = get_betas("cosine", 1000)
    acp = torch.cumprod(1 - cos, 0)
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert acp[499].item() == pytest.approx(f(500) / f(0), rel=1e-6)
    assert cos.max() <= 0.999
    with pytest.raises(KeyError, match="cosine.*linear"):
        get_betas("sigmoid", 10)


def test_q_sample_moments(diff):
    torch.manual_seed(0)
    x0 = torch.full((20000, 1, 1, 1), 0.7)
    t = torch.full((20000,), 300)
    xt = diff.q_sample(x0, t, torch.randn_like(x0))
    acp = torch.prod(1 - get_betas("linear", 1000)[:301]).item()
    assert xt.mean().item() == pytest.approx(math.sqrt(acp) * 0.7, abs=0.02)
    assert xt.var().item() == pytest.approx(1 - acp, rel=0.03)
    mean, var = diff.q_mean_variance(x0[:1], t[:1])
    assert mean.item() == pytest.approx(math.sqrt(acp) * 0.7, rel=1e-5)
    assert var.item() == pytest.approx(1 - acp, rel=1e-5)


@pytest.mark.parametrize("t", [1, 10, 500, 999])
def test_posterior_matches_the_product_of_gaussians(diff, t):
    # q(x_{t-1} | x_t, x_0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x_0): combine the two precisions directly.
    betas = get_betas("linear", 1000)
    beta, acp_prev = betas[t].item(), torch.prod(1 - betas[:t]).item()
    x0, xt = torch.tensor([[[[0.3]]]]), torch.tensor([[[[-0.8]]]])
    precision = 1 / (1 - acp_prev) + (1 - beta) / beta
    want_mean = (math.sqrt(acp_prev) * 0.3 / (1 - acp_prev) + math.sqrt(1 - beta) * -0.8 / beta) / precision
    mean, log_var = diff.q_posterior(x0, xt, torch.tensor([t]))
    assert mean.item() == pytest.approx(want_mean, rel=1e-5)
    assert math.exp(log_var.item()) == pytest.approx(1 / precision, rel=1e-5)


def test_space_timesteps_examples():
    assert space_timesteps(300, "10,15,20")[:3] == [0, 11, 22]
    assert len(space_timesteps(300, "10,15,20")) == 45
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(1000, "100")[0] == 0 and space_timesteps(1000, "100")[-1] == 999
    assert len(space_timesteps(1000, "100")) == 100
    assert space_timesteps(10, "") == list(range(10))
    with pytest.raises(ValueError, match="ddim"):
        space_timesteps(1000, "ddim600")
    with pytest.raises(ValueError, match="section"):
        space_timesteps(30, "20,1,1")


@pytest.mark.parametrize("spacing", ["100", "ddim25", "10,10,10"])
def test_respacing_keeps_alphas_cumprod_at_the_kept_steps(diff, spacing):
    short = create_diffusion("linear", 1000, spacing)
    kept = space_timesteps(1000, spacing)
    assert short.timestep_map.tolist() == kept
    assert torch.allclose(short.acp, diff.acp[kept], rtol=1e-10)


def test_vlb_is_zero_for_the_true_posterior_and_matches_a_mean_offset(diff):
    torch.manual_seed(0)
    x0 = torch.rand(3, 3, 4, 4) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([5, 200, 900])
    xt = diff.q_sample(x0, t, noise)
    v = -torch.ones_like(x0)  # v = -1 selects the (clipped) posterior variance, exact for t >= 1
    vb = diff.vb_terms_bpd(torch.cat([noise, v], 1), x0, xt, t)
    assert torch.allclose(vb, torch.zeros(3), atol=1e-5)
    # epsilon off by delta moves the mean by coef1 * sqrt(1/acp - 1) * delta: KL = dmu^2 / (2 var) nats
    delta = 0.1
    vb = diff.vb_terms_bpd(torch.cat([noise + delta, v], 1), x0, xt, t)
    for i, ti in enumerate(t.tolist()):
        dmu = diff.posterior_mean_coef1[ti].item() * math.sqrt(1 / diff.acp[ti].item() - 1) * delta
        want = dmu ** 2 / (2 * diff.posterior_variance[ti].item()) / math.log(2)
        assert vb[i].item() == pytest.approx(want, rel=1e-3)


def test_decoder_nll_at_t0_is_the_discretised_gaussian(diff):
    x0 = torch.tensor([-1.0, -0.2, 0.5, 1.0]).reshape(4, 1, 1, 1)
    mean, log_scale = torch.full_like(x0, 0.1), torch.full_like(x0, math.log(0.3))
    got = discretized_gaussian_log_likelihood(x0, mean, log_scale).flatten()
    s, m, w = 0.3, 0.1, 1 / 255
    want = [norm.logcdf((-1 + w - m) / s), math.log(norm.cdf((-0.2 + w - m) / s) - norm.cdf((-0.2 - w - m) / s)),
            math.log(norm.cdf((0.5 + w - m) / s) - norm.cdf((0.5 - w - m) / s)), norm.logsf((1 - w - m) / s)]
    assert got.tolist() == pytest.approx(want, rel=1e-4)


def test_hybrid_loss_trains_the_mean_with_mse_only_and_the_variance_with_vb_only(diff):
    x0 = torch.rand(2, 3, 4, 4) * 2 - 1
    eps_param = torch.zeros(2, 3, 4, 4, requires_grad=True)
    v_param = torch.zeros(2, 3, 4, 4, requires_grad=True)
    model = lambda x, t, c: torch.cat([eps_param, v_param], 1)  # noqa: E731
    losses = diff.training_losses(model, x0, torch.tensor([3, 600]), None, noise=torch.randn_like(x0))
    assert set(losses) == {"loss", "mse", "vb"} and losses["loss"].shape == (2,)
    losses["vb"].sum().backward(retain_graph=True)
    assert eps_param.grad is None or eps_param.grad.abs().sum() == 0  # stop-gradient on the mean
    assert v_param.grad.abs().sum() > 0
    v_param.grad = None
    losses["mse"].sum().backward()
    assert v_param.grad is None or v_param.grad.abs().sum() == 0
    assert eps_param.grad.abs().sum() > 0


def test_quartile_means_bin_by_t():
    t = torch.tensor([0, 249, 250, 999])
    q = quartile_means(torch.tensor([1.0, 3.0, 10.0, 7.0]), t, 1000, "loss")
    assert q == {"loss_q0": 2.0, "loss_q1": 10.0, "loss_q3": 7.0}


def _oracle(diff_full: GaussianDiffusion, target: torch.Tensor):
    """A network that knows the data is the single image ``target``: it returns the exact epsilon."""

    def model(x, t, cond):
        acp = diff_full.acp[t].float().reshape(-1, 1, 1, 1)
        eps = (x - acp.sqrt() * target) / (1 - acp).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], 1)

    return model


@pytest.mark.parametrize("spacing,sampler", [("ddim25", "ddim"), ("50", "ddpm"), ("5,5", "ddim")])
def test_samplers_recover_a_point_mass_through_the_timestep_map(diff, spacing, sampler):
    target = torch.rand(1, 3, 8, 8) * 1.6 - 0.8
    short = create_diffusion("linear", 1000, spacing)
    g = torch.Generator().manual_seed(0)
    x = short.sample(_oracle(diff, target), torch.zeros(2, 1), (2, 3, 8, 8), sampler, generator=g)
    assert (x - target).abs().max() < 0.02


def test_sampling_is_reproducible_with_a_seed(diff):
    short = create_diffusion("linear", 1000, "10")
    model = lambda x, t, c: torch.cat([0.5 * x, torch.zeros_like(x)], 1)  # noqa: E731
    a = short.sample(model, torch.zeros(2, 1), (2, 3, 4, 4), "ddpm", generator=torch.Generator().manual_seed(7))
    b = short.sample(model, torch.zeros(2, 1), (2, 3, 4, 4), "ddpm", generator=torch.Generator().manual_seed(7))
    c = short.sample(model, torch.zeros(2, 1), (2, 3, 4, 4), "ddpm", generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="ddpm.*ddim"):
        short.sample(model, torch.zeros(2, 1), (2, 3, 4, 4), "euler")

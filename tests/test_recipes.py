"""Training recipes, the conditioning diagnostic and classifier-free guidance: their math on cases with known
answers, and a CPU training step of each recipe."""
import pytest
import torch

from rcdm.config import RecipeConfig
from rcdm.diffusion.gaussian import Process, create_diffusion
from rcdm.errors import UserError
from rcdm.evaluation import conditioning_gains
from rcdm.model_files import load_trained
from rcdm.presets import build_unet
from rcdm.sampling import Guided, guided
from rcdm.train import forward_losses, learning_rate, representation_dropout, train

VPRED = RecipeConfig(name="vpred", prediction="v", learn_sigma=False, normalize_embeddings=True, cond_drop=0.1)


@pytest.mark.parametrize("prediction", ["epsilon", "v", "x0"])
def test_targets_invert_to_x0_and_v_is_the_published_formula(prediction):
    d = create_diffusion("cosine", 1000, prediction=prediction, learn_sigma=False)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(6, 3, 8, 8, generator=g) * 2 - 1, torch.randn(6, 3, 8, 8, generator=g)
    t = torch.tensor([0, 10, 300, 600, 900, 999])
    xt = d.q_sample(x0, t, noise)
    target = d.target(x0, noise, t)
    # epsilon -> x_0 divides by sqrt(alpha_bar), ~0 at the last step: there float32 cannot invert it
    ok = slice(None) if prediction != "epsilon" else slice(0, 5)
    assert torch.allclose(d.x0_from_prediction(target, xt, t)[ok], x0[ok], atol=1e-3)
    ab = d.acp[t].float().view(-1, 1, 1, 1)
    expected = {"epsilon": noise, "v": ab.sqrt() * noise - (1 - ab).sqrt() * x0, "x0": x0}[prediction]
    assert torch.allclose(target, expected, atol=1e-5)


def test_min_snr_weights_are_min_snr_gamma_in_x0_space():
    t = torch.tensor([50, 500, 950])
    per_target = {"epsilon": lambda s: s, "v": lambda s: s + 1, "x0": torch.ones_like}
    for prediction, per_target in per_target.items():
        d = create_diffusion("cosine", 1000, prediction=prediction, learn_sigma=False)
        snr = (d.acp / (1 - d.acp))[t].float()
        w = d.loss_weight(t, "min_snr", 5.0)
        assert torch.allclose(w, snr.clamp(max=5.0) / per_target(snr), rtol=1e-5)
    assert snr[0] > 5 > snr[2]  # the test covers both sides of the clip
    assert torch.equal(d.loss_weight(t, "uniform", 5.0), torch.ones(3))


def _oracle(d, size: int = 8):
    """A model that reads x_0 off its conditioning (cond = the flattened image) and answers exactly."""
    def model(x, t, cond, drop=None):
        x0 = cond.view(len(x), 3, size, size)
        noise = (x - d._at(d.sqrt_acp, t, x) * x0) / d._at(d.sqrt_one_minus_acp, t, x)
        return d.target(x0, noise, t)
    return model


@pytest.mark.parametrize("prediction", ["epsilon", "v", "x0"])
def test_an_oracle_has_zero_loss_and_full_conditioning_gain(prediction):
    d = create_diffusion("cosine", 1000, prediction=prediction, learn_sigma=False)
    x0 = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    h = x0.flatten(1)
    t = torch.randint(1, 1000, (8,))
    losses = forward_losses(_oracle(d), d, x0, h, t, recipe=RecipeConfig(prediction=prediction, learn_sigma=False))
    assert losses["loss"].abs().max() < 1e-6
    gains = conditioning_gains(_oracle(d), d, x0, h)
    assert set(gains) == {f"cond_gain_q{k}" for k in range(4)}
    assert all(v == pytest.approx(1.0, abs=1e-4) for v in gains.values())


def test_a_model_that_ignores_its_embedding_gains_nothing():
    torch.manual_seed(0)
    model = build_unet("tiny", 16, **VPRED.unet_options())  # as initialised: the output layer is zero
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    with torch.no_grad():
        model.ssl_emb.weight.zero_()  # the embedding's only way in, closed
    d = create_diffusion("cosine", 1000, prediction="v", learn_sigma=False)
    x0, h = torch.rand(6, 3, 32, 32) * 2 - 1, torch.randn(6, 16)
    gains = conditioning_gains(model.eval(), d, x0, h, null=True)
    assert len(gains) == 8 and all(v == pytest.approx(0.0, abs=1e-6) for v in gains.values())


def test_null_embedding_dropout_rate_and_normalisation():
    torch.manual_seed(0)
    assert representation_dropout(5, 0.0, torch.device("cpu")) is None
    drop = representation_dropout(200_000, 0.1, torch.device("cpu"))
    assert drop.dtype == torch.bool and drop.float().mean().item() == pytest.approx(0.1, abs=0.003)
    model = build_unet("tiny", 4, **VPRED.unet_options())
    with torch.no_grad():
        model.emb_mean.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        model.emb_std.fill_(2.0)
        model.null_emb.copy_(torch.tensor([9.0, 9.0, 9.0, 9.0]))
    cond = torch.tensor([[3.0, 4.0, 5.0, 6.0], [1.0, 2.0, 3.0, 4.0]])
    out = model.condition(cond, torch.tensor([False, True]))
    assert torch.equal(out, torch.tensor([[1.0, 1.0, 1.0, 1.0], [9.0, 9.0, 9.0, 9.0]]))
    assert {"emb_mean", "emb_std", "null_emb"} <= set(model.state_dict())  # saved with the weights


def test_guidance_at_scale_1_is_the_conditional_model_and_0_the_null_one():
    torch.manual_seed(0)
    model = build_unet("tiny", 8, **VPRED.unet_options())
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    model.eval()
    x, t, h = torch.randn(3, 3, 32, 32), torch.tensor([10, 500, 990]), torch.randn(3, 8)
    with torch.no_grad():
        plain, null = model(x, t, h), model(x, t, h, torch.ones(3, dtype=torch.bool))
        assert torch.allclose(Guided(model, 1.0)(x, t, h), plain, atol=1e-5)
        assert torch.allclose(Guided(model, 0.0)(x, t, h), null, atol=1e-5)
        assert torch.allclose(Guided(model, 3.0)(x, t, h), null + 3 * (plain - null), atol=1e-4)
    assert guided(model, 1.0) is model
    adm = build_unet("tiny", 8)
    with pytest.raises(UserError, match="no null embedding: use guidance=1"):
        guided(adm, 2.0)


def test_learning_rate_warm_up_and_schedules(typed):
    t = typed("sweep", ["train.lr=1.0", "train.steps=100"]).train
    assert [learning_rate(t, 4, s) for s in (0, 1, 3, 50)] == [0.25, 0.5, 1.0, 1.0]
    t.lr_schedule = "cosine"
    assert learning_rate(t, 0, 0) == 1.0 and learning_rate(t, 0, 50) == pytest.approx(0.5)
    assert learning_rate(t, 0, 100) == pytest.approx(0.0)


@pytest.mark.parametrize("recipe", ["adm", "vpred"])
def test_a_cpu_step_of_each_recipe_and_its_checkpoint_describes_it(recipe, tmp_path, dataset, typed):
    cfg = typed("sweep", ["data=shards", f"data.url={dataset}", "encoder=dino", f"recipe={recipe}",
                          "train.steps=2", "train.batch_size=4", "train.loader_workers=0", "train.log_every=1",
                          "grid.images=1", "grid.samples=1", "grid.steps=ddim2", "faithfulness.images=2",
                          "faithfulness.steps=ddim2", "diagnostic.images=2", f"storage.run_root={tmp_path / 'r'}",
                          f"tracking.uri=sqlite:///{tmp_path / 'm.db'}"])
    metrics = train(cfg)
    assert metrics["step"] == 2 and all(f"cond_gain_q{k}" in metrics for k in range(4))
    assert ("null_gain_q3" in metrics) == (recipe == "vpred") and ("vb" in metrics) == (recipe == "adm")
    loaded = load_trained(cfg.run_root)
    want = {"adm": Process("linear", 1000, "epsilon", True), "vpred": Process("cosine", 1000, "v", False)}[recipe]
    assert loaded.process == want
    assert loaded.model.cfg.null_embedding == (recipe == "vpred")
    if recipe == "vpred":  # the training split's statistics travel in the weights
        from rcdm.data import embedding_stats, open_dataset

        mean, std, _ = embedding_stats(open_dataset(dataset, "dino", "backbone"))
        assert torch.allclose(loaded.model.emb_mean, mean) and torch.allclose(loaded.model.emb_std, std)
    assert (tmp_path / "r" / "rcdm-demo" / "main" / "dino-backbone-tiny" / "conditioning.json").exists()


def test_whitened_embeddings_have_identity_covariance_and_travel_with_the_weights(tmp_path, dataset, typed):
    from rcdm.data import embedding_stats, heldout, open_dataset, zca

    with pytest.raises(UserError, match="needs recipe.normalize_embeddings=true"):
        RecipeConfig(whiten_embeddings=True)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(20000, 6, generator=g) @ torch.diag(torch.tensor([10.0, 3.0, 1.0, 0.3, 0.1, 0.03])) @ torch.linalg.qr(
        torch.randn(6, 6, generator=g))[0] + 5
    mean, w = zca(h, eps=1e-9)
    assert torch.allclose(torch.cov(((h - mean) @ w).T), torch.eye(6), atol=2e-2)  # every direction at one scale
    info = open_dataset(dataset, "dino", "backbone")
    h = heldout(info, 3)[1]  # embeddings of held-out images

    cfg = typed("sweep", ["data=shards", f"data.url={dataset}", "encoder=dino", "recipe=vpred",
                          "recipe.whiten_embeddings=true", "train.steps=1", "train.batch_size=4",
                          "train.loader_workers=0", "grid.images=1", "grid.samples=1", "grid.steps=ddim2",
                          "faithfulness.images=0", "invariance.images=0", "diagnostic.images=2",
                          f"storage.run_root={tmp_path / 'r'}", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}"])
    train(cfg)
    loaded = load_trained(cfg.run_root)
    assert loaded.model.cfg.whiten_embeddings
    assert torch.allclose(loaded.model.emb_white, embedding_stats(info, whiten=True)[2])
    out = loaded.model.condition(h[:3])
    assert torch.allclose(out, (h[:3] - loaded.model.emb_mean) @ loaded.model.emb_white, atol=1e-5)


def test_training_timesteps_uniform_is_the_released_draw_and_logit_normal_its_published_law():
    from rcdm.diffusion.schedules import training_timesteps

    torch.manual_seed(3)
    want = torch.randint(0, 1000, (64,))
    torch.manual_seed(3)
    assert torch.equal(training_timesteps(64, 1000, "cpu"), want)  # the ADM recipe's draw, unchanged
    torch.manual_seed(0)
    t = training_timesteps(200_000, 1000, "cpu", "logit_normal", 0.0, 1.0)
    assert t.min() >= 0 and t.max() <= 999 and t.dtype == torch.int64
    u = (t.double() + 0.5) / 1000
    logit = torch.log(u / (1 - u))
    assert abs(logit.mean().item()) < 0.02 and abs(logit.std().item() - 1.0) < 0.03
    # a positive mean moves the steps towards the noise: the median at sigmoid(1) of the schedule
    hi = training_timesteps(200_000, 1000, "cpu", "logit_normal", 1.0, 1.0).double().median().item()
    assert abs(hi - 1000 * torch.sigmoid(torch.tensor(1.0)).item()) < 3
    with pytest.raises(ValueError, match="unknown timestep distribution 'beta'"):
        training_timesteps(2, 1000, "cpu", "beta")


@pytest.mark.parametrize("override, key", [("recipe.timesteps=beta", "recipe.timesteps"),
                                           ("recipe.timestep_std=0", "recipe.timestep_std")])
def test_a_timestep_distribution_out_of_range_is_one_error(override, key, typed):
    with pytest.raises(UserError, match=f"{key}=.* is out of range"):
        typed("sweep", [override])

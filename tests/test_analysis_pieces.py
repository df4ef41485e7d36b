"""The analyses' pieces without a trained model: manipulation's shared dimensions, the augmentation
families, FGSM, fidelity metrics, the factor reader along a path, Wilson intervals, synthetic inputs."""
import pytest
import torch

from rcdm.errors import UserError
from rcdm.probes import synthetic_set

# --- manipulation, invariance, adversarial, fidelity: the pieces ------------------------------------------

def test_shared_dimensions_are_the_ones_the_neighbours_share():
    from rcdm.analysis.manipulate import edit, shared_dimensions, transfer_numbers

    g = torch.Generator().manual_seed(0)
    pool = torch.randn(200, 16, generator=g)
    pool[:10, 3] += 6.0  # ten images share a large value on dims 3 and 7, and sit close together
    pool[:10, 7] -= 6.0
    source = pool[0].clone()
    nn_idx, dims, values = shared_dimensions(pool, source, k=8, fraction=2 / 16)
    assert set(nn_idx.tolist()) <= set(range(1, 10))  # neighbours from the group, never the source itself
    assert set(dims.tolist()) == {3, 7}
    target = pool[150]
    edited = edit(target, dims, values)
    assert torch.equal(edited[[0, 1, 2, 4]], target[[0, 1, 2, 4]]) and torch.equal(edited[dims], values[dims])
    scale = pool.std(0)
    full = transfer_numbers(edited[None].repeat(4, 1), target[None].repeat(4, 1), dims, values, scale)
    none = transfer_numbers(target[None].repeat(4, 1), target[None].repeat(4, 1), dims, values, scale)
    assert full["transfer"] == pytest.approx(1.0) and none["transfer"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="more than k"):
        shared_dimensions(pool[:5], source, k=8, fraction=0.1)


def test_attribute_direction_is_the_difference_of_the_value_groups_means():
    from rcdm.analysis.manipulate import attribute_direction

    pool = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 4.0], [9.0, 9.0]])
    labels = torch.tensor([0, 0, 1, 1, 0])
    known = torch.tensor([True, True, True, True, False])  # the last image has no value (grayscale: no colour)
    direction, group = attribute_direction(pool, labels, known, source_value=1, target_value=0)
    assert torch.allclose(direction, torch.tensor([-2.0, 3.0])) and group.tolist() == [2, 3]
    with pytest.raises(ValueError, match="at least 2"):
        attribute_direction(pool, labels, known, source_value=2, target_value=0)


def test_mean_ci_brackets_the_mean_and_shrinks_with_agreement():
    from rcdm.stats import mean_ci

    m, (lo, hi) = mean_ci([0.0, 1.0] * 8)
    assert m == pytest.approx(0.5) and lo < 0.5 < hi
    m, (lo, hi) = mean_ci([0.5] * 16)
    assert lo == hi == m == pytest.approx(0.5)
    assert mean_ci([0.1, 0.9, 0.4]) == mean_ci([0.1, 0.9, 0.4])  # seeded: the same numbers, the same interval


def test_augmentation_families_do_what_they_say():
    from rcdm.analysis.invariance import FAMILIES, augment, embedding_invariance

    images, factors = synthetic_set(8, 3, "probe")
    x = images.float() / 255
    g = torch.Generator().manual_seed(0)
    assert torch.equal(augment("flip", x, g), x.flip(3))
    gray = augment("grayscale", x, g)
    assert torch.allclose(gray[:, 0], gray[:, 1]) and torch.allclose(gray[:, 1], gray[:, 2])
    for family in FAMILIES:
        v = augment(family, x, g)
        assert v.shape == x.shape and v.min() >= 0 and v.max() <= 1 and not torch.allclose(v, x)
    # zooming on the centre makes the object cover more of the image: fewer background pixels
    bg = lambda im: (im - im[:, :, :1, :1]).abs().sum(1).lt(0.05).float().mean()  # noqa: E731
    assert bg(augment("crop_scale", x, g)) < bg(x)
    h = {"backbone": torch.randn(8, 5, generator=g)}
    same = embedding_invariance(h, {"flip": {"backbone": h["backbone"].clone()}})
    assert same["flip"]["backbone"]["invariance_index"] == pytest.approx(1.0)
    other = embedding_invariance(h, {"flip": {"backbone": h["backbone"].roll(1, 0)}})
    assert other["flip"]["backbone"]["invariance_index"] < 0.5


def test_fgsm_flips_more_with_epsilon_and_stays_within_it():
    from rcdm.analysis.adversarial import attack, fgsm

    class Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Linear(3 * 8 * 8, 2)

        def embed(self, x):
            return x.flatten(1)

        def forward(self, x):
            return self.w(x.flatten(1))

    torch.manual_seed(0)
    model = Linear()
    x = torch.rand(64, 3, 8, 8) * 1.6 - 0.8
    y = model(x).argmax(1)
    xa = fgsm(model, x, y, 4.0)
    assert (xa - x).abs().max() <= 4.0 / 127.5 + 1e-6
    results, perturbed = attack({"ssl": model}, x, y, (0.0, 1.0, 8.0, 64.0))
    flips = results["ssl"]["flip_rate"]
    assert flips[0] == 0 and flips == sorted(flips) and flips[-1] > 0.5
    assert set(perturbed) == {0.0, 1.0, 8.0, 64.0}


def test_fidelity_metrics_on_a_small_feature_extractor():
    """FID, IS and precision/recall through torch-fidelity on features of a small network (no download)."""
    from rcdm.analysis.fidelity import extract, fidelity

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
                              torch.nn.Flatten())  # 32-d features
    head = torch.nn.Linear(32, 10)

    def extractor(images):
        with torch.no_grad():
            f = net(images)
            return {"features": f.double(), "logits": head(f).double() * 20}

    real = torch.rand(300, 3, 16, 16) * 2 - 1
    same = fidelity(extract(extractor, real), extract(extractor, real))
    assert same["fid"] == pytest.approx(0.0, abs=1e-6) and same["precision"] == 1.0 and same["recall"] == 1.0
    shifted = fidelity(extract(extractor, (real * 0.3 + 0.5).clamp(-1, 1)), extract(extractor, real))
    assert shifted["fid"] > 0.01 and shifted["recall"] < same["recall"]
    assert 1.0 <= same["inception_score"] <= 10.0


def test_inception_weights_missing_offline_name_the_file_and_cache(tmp_path, monkeypatch):
    from rcdm.analysis.fidelity import INCEPTION_URL, InceptionFeatures
    from rcdm.errors import UserError

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(UserError) as e:
        InceptionFeatures(torch.device("cpu"), download=False)
    assert INCEPTION_URL in str(e.value)
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth") in str(e.value)


def test_factor_path_reads_a_then_b_along_the_path_and_wilson_intervals_bound_the_share():
    from rcdm.analysis.interpolate import factor_path
    from rcdm.stats import wilson
    from rcdm.synthetic import SHAPES

    class Brightness(torch.nn.Module):  # a "factor reader": dark images are shape 0, bright ones shape 1
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            bright = (x.mean((1, 2, 3)) > 0).long()
            return {"shape": torch.nn.functional.one_hot(bright, len(SHAPES)).float()}

    fa = {"shape": SHAPES[0], "colour": "red", "background": "dark", "scale": 0.5, "x": 0.5, "y": 0.5,
          "grayscale": False}
    fb = {**fa, "shape": SHAPES[1]}
    grid = torch.cat([-torch.ones(2, 3, 3, 8, 8), torch.ones(2, 2, 3, 8, 8)], 1)  # 2 rows, 5 points: A A A B B
    out = factor_path(Brightness(), grid, fa, fb)
    assert out["differing"] == ["shape"]
    assert out["shows_a"] == [1, 1, 1, 0, 0] and out["shows_b"] == [0, 0, 0, 1, 1]
    for k, n in ((0, 10), (3, 10), (10, 10), (1, 2)):
        lo, hi = wilson(k, n)
        assert 0 <= lo <= k / n <= hi <= 1 and hi - lo > 0
    assert wilson(0, 10)[0] == 0 and wilson(10, 10)[1] == 1
    assert all(wilson(n, n)[1] == 1.0 and wilson(0, n)[0] == 0.0 for n in range(1, 2000))  # exact, not 1 - 1e-16


def test_single_synthetic_images_by_name_carry_their_factors():
    from rcdm.analysis.images import load_inputs

    pair = load_inputs(["synthetic/analysis/3", "synthetic/analysis/7"], 32)
    first8 = load_inputs("synthetic:8", 32)
    assert pair.names == ["synthetic/analysis/3", "synthetic/analysis/7"]
    assert pair.factors == [first8.factors[3], first8.factors[7]]
    with pytest.raises(UserError, match="mixes synthetic images and files"):
        load_inputs(["synthetic/analysis/3", "a.png"], 32)


def test_the_default_factor_readers_ship_and_are_checked(tmp_path, monkeypatch):
    """A new machine reads factors without training a reader (it cost about two minutes of the first run): the
    default reader and the adversarial probe's supervised baseline load from the package, nothing is cached or
    trained; a shipped file that does not match its sha256 is refused."""
    import shutil

    from rcdm.analysis import factors
    from rcdm.errors import UserError

    monkeypatch.setenv("RCDM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(factors, "train_factor_net", lambda cfg: pytest.fail(f"trained a reader for {cfg}"))
    for cfg in (factors.FactorNetConfig(), factors.FactorNetConfig(soften=False)):
        net, report = factors.factor_net(cfg)
        assert report["config"] == {**factors.asdict(cfg)} and report["test_accuracy"]["shape"] > 0.95
    assert not (tmp_path / "cache").exists()
    shipped = tmp_path / "readers"
    shutil.copytree(factors.SHIPPED, shipped)
    key = factors.FactorNetConfig().key()
    (shipped / f"{key}.pt").write_bytes((shipped / f"{key}.pt").read_bytes()[:-4] + b"abcd")
    monkeypatch.setattr(factors, "SHIPPED", shipped)
    with pytest.raises(UserError, match="does not match its sha256"):
        factors.factor_net(factors.FactorNetConfig())

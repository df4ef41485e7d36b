"""Adversarial probe: how far does a small adversarial perturbation move an embedding and a prediction?

FGSM (Goodfellow et al. 2015), x_adv = clip(x + eps * sign(grad_x loss)), at several pixel epsilons,
against (a) a supervised classifier (the tiny ResNet trained end to end on the labels) and (b) a
linear probe over the frozen SSL embedding at the RCDM's level, each attacked through its own
gradient. Per epsilon: how many predictions flip, accuracy, and the embedding drift (1 - cosine to the
clean embedding) of the SSL level and of the supervised trunk. RCDM samples conditioned on the
perturbed SSL embeddings show what the perturbation did to the representation. The paper's finding 3:
the SSL probe flips less than the supervised classifier at small epsilon.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from rcdm.analysis.base import Inputs, Result
from rcdm.analysis.factors import FactorNet, FactorNetConfig, factor_net, predict
from rcdm.errors import UserError
from rcdm.grids import cells_png
from rcdm.encoders import embed_in_chunks
from rcdm.preprocess import IMAGENET_MEAN, IMAGENET_STD
from rcdm.probes import fit_linear_probe
from rcdm.config import READER_STEPS

EPSILONS = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)  # in 0-255 pixel units
NAME = "adversarial"


@dataclass
class Options:
    task: str = "shape"  # the factor attacked
    epsilons: list[float] = field(default_factory=lambda: list(EPSILONS))
    probe_images: int = 2000  # labelled images the SSL probe is fitted on
    reader_steps: int = READER_STEPS  # training steps of the supervised baseline and of the factor reader


def encoder_input(encoder, x: torch.Tensor) -> torch.Tensor:
    """Differentiable [-1, 1] images -> the encoder's input (size and normalisation of its preprocess)."""
    size = encoder.preprocess.size
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True)
    if encoder.preprocess.normalize == "minus_one_one":
        return x
    mean = torch.tensor(IMAGENET_MEAN, device=x.device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, device=x.device)[:, None, None]
    return ((x + 1) / 2 - mean) / std


class SSLProbe(torch.nn.Module):
    """Frozen encoder level -> standardised features -> linear classifier."""

    def __init__(self, encoder, level: str, mean, std, w, b):
        super().__init__()
        self.encoder, self.level = encoder, level
        for k, v in {"mean": mean, "std": std, "w": w, "b": b}.items():
            self.register_buffer(k, v.detach().clone())

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(encoder_input(self.encoder, x))[self.level].float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((self.embed(x) - self.mean) / self.std) @ self.w + self.b


class SupervisedHead(torch.nn.Module):
    """One factor's head of the supervised factor net, as a classifier with an embedding (its trunk)."""

    def __init__(self, net: FactorNet, factor: str):
        super().__init__()
        self.net, self.factor = net, factor

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.heads[self.factor](self.net.features(x))


def ssl_probe(encoder, level: str, images: torch.Tensor, labels: torch.Tensor) -> SSLProbe:
    """Fit the linear probe on the frozen embeddings of ``images`` [N, 3, S, S] in [-1, 1]."""
    feats = embed_in_chunks(encoder, images, lambda c: encoder_input(encoder, c))[level]
    mean, std, w, b = fit_linear_probe(feats, labels)
    return SSLProbe(encoder, level, mean, std, w, b).eval()


def fgsm(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """x [N, 3, S, S] in [-1, 1]; eps in 0-255 pixel units."""
    if eps == 0:
        return x.clone()
    x = x.clone().requires_grad_(True)
    loss = F.cross_entropy(model(x), y)
    (grad,) = torch.autograd.grad(loss, x)
    return (x + eps / 127.5 * grad.sign()).clamp(-1, 1).detach()


def attack(models: dict[str, torch.nn.Module], x: torch.Tensor, y: torch.Tensor,
           epsilons=EPSILONS) -> tuple[dict, dict[float, torch.Tensor]]:
    """{model: {flip_rate, accuracy, embedding_drift: [per eps]}} and the perturbed images per eps of
    the model named "ssl" (to condition samples on)."""
    out, ssl_images = {}, {}
    for name, model in models.items():
        model.eval()
        with torch.no_grad():
            clean_pred = model(x).argmax(1)
            clean_emb = model.embed(x)
        rows = {"epsilon": list(epsilons), "flip_rate": [], "accuracy": [], "embedding_drift": []}
        for eps in epsilons:
            xa = fgsm(model, x, y, eps)
            with torch.no_grad():
                pred = model(xa).argmax(1)
                drift = 1 - F.cosine_similarity(model.embed(xa), clean_emb, dim=1)
            rows["flip_rate"].append(float((pred != clean_pred).float().mean()))
            rows["accuracy"].append(float((pred == y).float().mean()))
            rows["embedding_drift"].append(float(drift.mean()))
            if name == "ssl":
                ssl_images[eps] = xa
        out[name] = rows
    return out, ssl_images


def curves_png(results: dict, title: str) -> bytes:
    """Flip rate and embedding drift against epsilon, one line per model."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), dpi=100)
    for name, r in results.items():
        for ax, key in zip(axes, ("flip_rate", "embedding_drift")):
            ax.plot(r["epsilon"], r[key], marker="o", label=name)
    for ax, label in zip(axes, ("prediction flip rate", "embedding drift (1 - cos)")):
        ax.set_xlabel("FGSM epsilon (of 255)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def run(inputs: Inputs, opts: Options) -> Result:
    """FGSM against a supervised classifier and a linear probe on the SSL level; samples conditioned on the
    perturbed SSL embeddings, read by the factor reader: do they still show the image's true factor?"""
    from rcdm.stats import wilson
    from rcdm.probes import factor_labels, synthetic_set

    labels = factor_labels(inputs.need_factors(NAME))
    if opts.task not in labels:
        raise UserError(f"unknown adversarial.task {opts.task!r}; choose a factor: {', '.join(labels)}")
    size, device, name, level = inputs.image_size, inputs.device, inputs.loaded.card.encoder.name, inputs.level
    y, mask = labels[opts.task]
    x, y = inputs.images[mask].to(device), y[mask].to(device)
    train_x, train_f = synthetic_set(opts.probe_images, 13, "adversarial-probe", size)
    ty, tmask = factor_labels(train_f)[opts.task]
    probe = ssl_probe(inputs.encoder, level, (train_x[tmask].float() / 127.5 - 1).to(device), ty[tmask].to(device))
    # the supervised baseline: trained on labels with no blur / noise augmentation (that would buy it robustness)
    net, report = factor_net(FactorNetConfig(image_size=size, steps=opts.reader_steps, soften=False))
    models = {"supervised": SupervisedHead(net.to(device), opts.task), "ssl": probe}
    results, perturbed = attack(models, x, y, tuple(float(e) for e in opts.epsilons))
    small = next((i for i, e in enumerate(results["ssl"]["epsilon"]) if e > 0), None)
    numbers = {"task": opts.task, "images": len(x), "models": results,
               "supervised_test_accuracy": report["test_accuracy"][opts.task],
               "ssl_probe": f"linear probe on frozen {name} {level} embeddings, {int(tmask.sum())} training images"}
    metrics = {}
    if small is not None:
        eps = results["ssl"]["epsilon"][small]
        numbers["smallest_epsilon"] = eps
        numbers["ssl_flips_less_at_smallest_epsilon"] = (results["ssl"]["flip_rate"][small]
                                                        < results["supervised"]["flip_rate"][small])
        metrics = {f"adversarial_flip_rate_{m}_eps{eps:g}": results[m]["flip_rate"][small] for m in results}
    reader, reader_report = factor_net(FactorNetConfig(image_size=size, steps=opts.reader_steps))
    k = min(4, len(x))
    rows, reads = [], {"epsilon": [], "samples_show_true": [], "samples_show_true_ci95": []}
    for eps, xa in perturbed.items():
        with torch.no_grad():
            h = torch.cat([probe.embed(chunk) for chunk in xa.split(inputs.sampling.batch_size)])
        s = inputs.draw(h)
        hit = predict(reader, s)[opts.task] == y.cpu()
        reads["epsilon"].append(eps)
        reads["samples_show_true"].append(float(hit.float().mean()))
        reads["samples_show_true_ci95"].append(wilson(int(hit.sum()), len(hit)))
        rows.append(torch.stack([t for i in range(k) for t in (xa[i].cpu(), s[i])]))
    numbers["samples"] = {**reads, "reader": f"the synthetic-factor predictor ({opts.task} accuracy "
                                            f"{reader_report['test_accuracy'][opts.task]:.3f} on rendered images)",
                          "conditioned_on": f"{name} {level} embeddings of the images perturbed against the SSL probe"}
    if small is not None:
        metrics[f"adversarial_samples_show_true_eps{numbers['smallest_epsilon']:g}"] = reads["samples_show_true"][small]
    title = f"FGSM on {opts.task}: supervised tiny ResNet vs linear probe on {name} {level} ({len(x)} images)"
    return Result(numbers, metrics, {"": curves_png(results, title), "_samples": cells_png(torch.cat(rows), 2 * k)})

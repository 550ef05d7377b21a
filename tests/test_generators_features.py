"""Generators, EMA, feature maps (frozen, differentiable in the input), the digits encoder, FID."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from pydantic import ValidationError
from torch import nn

from workloads.config import WorkloadConfig
from workloads.datasets import load_digits_arrays
from workloads.features import (
    DIGITS_ENCODER_VERSION,
    build_feature_map,
    load_digits_encoder,
    multiscale,
)
from workloads.fid import evaluation_extractor, fid_from_samples
from workloads.generators import EMA, build_generator



@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """One intra-op thread: on a shared 2-core machine torch's thread pool slows small ops 5x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def encoder_cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("encoder") / "digits_encoder.pt"
    load_digits_encoder(path)
    return path


def _digits_config(**overrides) -> WorkloadConfig:
    return WorkloadConfig(data={"name": "digits"}, batch_size=64, **overrides)


# ---------------------------------------------------------------------------------------- generators


def test_mlp_generator_layers_and_shape():
    config = WorkloadConfig(generator={"num_layers": 3, "hidden_dim": 32, "noise_dim": 5})
    model = build_generator(config)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(5, 32), (32, 32), (32, 2)]
    assert model(torch.randn(7, 5)).shape == (7, 2)


@pytest.mark.parametrize("name, shape", [("digits", (1, 8, 8)), ("cifar10", (3, 32, 32))])
def test_conv_generator_image_shape_and_range(name, shape):
    config = WorkloadConfig(data={"name": name}, batch_size=64, generator={"hidden_dim": 64})
    model = build_generator(config)
    assert any(isinstance(m, nn.Conv2d) for m in model.modules())
    images = model(10 * torch.randn(9, config.generator.noise_dim))
    assert images.shape == (9, *shape)
    assert images.abs().max() <= 1  # tanh output, the pixel range of the data


def test_conv_generator_on_toy_is_rejected():
    with pytest.raises(ValueError, match="generator.name='conv' needs image data"):
        build_generator(WorkloadConfig(generator={"name": "conv"}))


def test_ema_update_is_the_convex_combination():
    model = nn.Linear(3, 2)
    ema = EMA(model, decay=0.9)
    old = [p.detach().double().clone() for p in ema.model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for before, after, new in zip(old, ema.model.parameters(), model.parameters()):
        new = new.detach().double()
        # float32 arithmetic: the rounding error scales with the summands, not with the result (which
        # can cancel to near 0, where a relative tolerance fails; stop 9's CI drew such an init).
        bound = 4 * torch.finfo(torch.float32).eps * (0.9 * before.abs() + 0.1 * new.abs())
        assert torch.all((after.double() - (0.9 * before + 0.1 * new)).abs() <= bound)
    assert not any(p.requires_grad for p in ema.model.parameters())
    restored = EMA(nn.Linear(3, 2), decay=0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.decay == 0.9 and torch.equal(restored.model.weight, ema.model.weight)


# -------------------------------------------------------------------------------------- feature maps


def test_identity_features_flatten():
    images = torch.randn(4, 1, 8, 8)
    (features,) = build_feature_map(_digits_config(feature_map="identity"))(images)
    assert torch.equal(features, images.reshape(1, 4, 64))


def test_random_projection_is_seeded_and_preserves_norms_on_average():
    def project(seed: int, x: torch.Tensor) -> torch.Tensor:
        config = _digits_config(feature_map="random_projection", features={"projection_dim": 256, "projection_seed": seed})
        return build_feature_map(config)(x)[0][0]

    x = torch.randn(2000, 1, 8, 8)
    same, again, other = project(1, x), project(1, x), project(2, x)
    assert same.shape == (2000, 256)
    assert torch.equal(same, again) and not torch.equal(same, other)
    # N(0, 1/k) entries: E ||W^T x||^2 = ||x||^2 (Johnson-Lindenstrauss scaling); the ratio's
    # standard deviation per sample is sqrt(2/k) ~ 0.09, so over 2000 samples the mean is within 1%.
    ratio = same.square().sum(1) / x.flatten(1).square().sum(1)
    assert abs(float(ratio.mean()) - 1) < 0.02


def test_multiscale_against_numpy():
    fmap = torch.randn(3, 5, 4, 2, dtype=torch.float64)
    out = multiscale(fmap).numpy()
    reference = fmap.numpy()
    assert out.shape == (4 * 2 + 2, 3, 5)
    for h in range(4):
        for w in range(2):
            np.testing.assert_array_equal(out[h * 2 + w], reference[:, :, h, w])
    np.testing.assert_allclose(out[-2], reference.mean(axis=(2, 3)), rtol=1e-12)
    # The 1e-6 variance floor moves the std by < 1e-5 for unit-scale features.
    np.testing.assert_allclose(out[-1], reference.std(axis=(2, 3)), atol=1e-5)


def test_digits_encoder_features_frozen_multiscale_and_differentiable(encoder_cache):
    feature_map = build_feature_map(_digits_config(feature_map="digits_encoder", features={"encoder_cache": str(encoder_cache)}))
    assert not any(p.requires_grad for p in feature_map.parameters()) and not feature_map.training
    images = torch.rand(6, 1, 8, 8) * 2 - 1
    shapes = [tuple(f.shape) for f in feature_map(images)]
    assert shapes == [(8 * 8 + 2, 6, 32), (4 * 4 + 2, 6, 64), (2 * 2 + 2, 6, 128)]
    # Gradient with respect to the INPUT matches finite differences (float64). Checked on 4 fixed
    # random combinations of all features: the full Jacobian would need 8000 backward passes.
    feature_map = feature_map.double()
    x = (torch.rand(2, 1, 8, 8, dtype=torch.float64) * 2 - 1).requires_grad_()
    combine = torch.randn(2 * (66 * 32 + 18 * 64 + 6 * 128), 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: torch.cat([f.flatten() for f in feature_map(t)]) @ combine, (x,))


def test_digits_encoder_is_deterministic_accurate_and_cached(encoder_cache, tmp_path):
    first = load_digits_encoder(encoder_cache)
    second_path = tmp_path / "second.pt"
    second = load_digits_encoder(second_path)  # a fresh, independent build
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    images, labels = load_digits_arrays()
    assert torch.equal(first.penultimate(images), second.penultimate(images))
    assert first.meta["version"] == DIGITS_ENCODER_VERSION
    # A useful feature space: held-out accuracy well above chance (0.1); measured 0.97.
    assert first.meta["val_accuracy"] > 0.9
    # Second use reads the cache: the file is not rewritten.
    mtime = second_path.stat().st_mtime_ns
    assert load_digits_encoder(second_path).meta == second.meta and second_path.stat().st_mtime_ns == mtime


def test_feature_map_errors_are_one_line(tmp_path):
    with pytest.raises(ValueError) as error:
        build_feature_map(_digits_config(feature_map="pretrained", features={"pretrained_weights": str(tmp_path / "w.pt")}))
    assert "feature_map='pretrained' needs torchvision" in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(ValueError, match="feature_map='digits_encoder' takes 1x8x8 digits"):
        build_feature_map(WorkloadConfig(data={"name": "cifar10"}, batch_size=64, feature_map="digits_encoder"))
    with pytest.raises(ValidationError, match="feature_map"):
        WorkloadConfig(feature_map="vgg")


# ----------------------------------------------------------------------------------------------- FID


def _scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Heusel et al. 2017 Eq. 6 with scipy's matrix square root (pytorch-fid's computation)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    sigma_a, sigma_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(sigma_a @ sigma_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sigma_a + sigma_b - 2 * covmean))


def test_fid_with_own_extractor_matches_scipy(encoder_cache):
    name, extract = evaluation_extractor(_digits_config(features={"encoder_cache": str(encoder_cache)}))
    assert name == DIGITS_ENCODER_VERSION
    images, _ = load_digits_arrays()
    generator = torch.Generator().manual_seed(0)
    real, other = images[:800], images[800:1600]
    noisy = {std: (other + std * torch.randn(800, 1, 8, 8, generator=generator)).clamp(-1, 1) for std in (0.5, 1.0)}
    with torch.no_grad():
        expected = _scipy_frechet(extract(real).double().numpy(), extract(noisy[0.5]).double().numpy())
    fid = {std: fid_from_samples(real, images, extract) for std, images in noisy.items()}
    np.testing.assert_allclose(fid[0.5], expected, rtol=1e-4)
    # More pixel noise, larger FID; two halves of the real data are closer than either
    # (measured: 20, 55, 127).
    assert fid_from_samples(real, other, extract) < 0.5 * fid[0.5] < 0.5 * fid[1.0]


def test_toy_extractor_is_raw_coordinates():
    name, extract = evaluation_extractor(WorkloadConfig())
    x = torch.randn(5, 2)
    assert name == "raw" and torch.equal(extract(x), x)


def test_cifar_fid_without_inception_is_one_line(monkeypatch):
    monkeypatch.delenv("DRIFTSWEEP_INCEPTION_WEIGHTS", raising=False)
    with pytest.raises(ValueError) as error:
        evaluation_extractor(WorkloadConfig(data={"name": "cifar10"}, batch_size=64))
    assert "DRIFTSWEEP_INCEPTION_WEIGHTS" in str(error.value) and "eval.fid=false" in str(error.value)

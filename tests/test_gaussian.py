"""Known answers for the streamed per-position Gaussian."""

import numpy as np
import pytest
import torch
from sklearn.covariance import EmpiricalCovariance

from padim_core.gaussian import (
    COVARIANCE_RIDGE,
    FewImagesWarning,
    RunningGaussian,
)


def _embeddings(n: int, c: int = 5, h: int = 3, w: int = 2, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(n, c, h, w, generator=generator)
    # Correlated channels and a large offset make cancellation errors visible.
    mixing = torch.randn(c, c, generator=generator)
    return torch.einsum("nchw,dc->ndhw", base, mixing) + 50.0


def _fit(embedding: torch.Tensor, batch: int) -> RunningGaussian:
    n, c, h, w = embedding.shape
    stats = RunningGaussian.empty(h * w, c)
    for start in range(0, n, batch):
        stats.update(embedding[start : start + batch])
    return stats


def _per_position(embedding: torch.Tensor, position: int) -> np.ndarray:
    n, c = embedding.shape[:2]
    return embedding.reshape(n, c, -1)[:, :, position].double().numpy()


@pytest.mark.parametrize("batch", [1, 3, 40])
def test_mean_and_covariance_match_numpy(batch):
    embedding = _embeddings(40)
    stats = _fit(embedding, batch)
    for position in range(stats.positions):
        x = _per_position(embedding, position)
        expected = np.cov(x, rowvar=False) + COVARIANCE_RIDGE * np.eye(x.shape[1])
        np.testing.assert_allclose(stats.mean[position].numpy(), x.mean(0), rtol=1e-5)
        np.testing.assert_allclose(
            stats.covariance()[position].numpy(), expected, rtol=1e-4, atol=1e-4
        )


def test_mahalanobis_matches_scikit_learn():
    train, test = _embeddings(60), _embeddings(7, seed=1)
    gaussian = _fit(train, 16).to_gaussian()
    distances = gaussian.mahalanobis(test)
    assert distances.shape == (7, 3, 2)

    for position in range(6):
        x = _per_position(train, position)
        covariance = np.cov(x, rowvar=False) + COVARIANCE_RIDGE * np.eye(x.shape[1])
        reference = EmpiricalCovariance(assume_centered=False)
        reference.location_ = x.mean(0)
        reference._set_covariance(covariance)
        squared = reference.mahalanobis(_per_position(test, position))
        row, column = divmod(position, 2)
        np.testing.assert_allclose(
            distances[:, row, column].numpy(), np.sqrt(squared), rtol=1e-4
        )


def test_two_halves_merge_into_the_whole():
    embedding = _embeddings(50)
    whole = _fit(embedding, 50)
    first, second = _fit(embedding[:21], 8), _fit(embedding[21:], 5)
    first.merge(second)

    assert first.count == whole.count == 50
    torch.testing.assert_close(first.mean, whole.mean, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(
        first.covariance(), whole.covariance(), rtol=1e-5, atol=1e-5
    )


def test_merge_into_empty_copies_and_centering_keeps_the_fit():
    embedding = _embeddings(30)
    source = _fit(embedding, 7)
    target = RunningGaussian.empty(source.positions, source.channels)
    target.merge(source)
    covariance = source.covariance()
    target.center()

    assert torch.count_nonzero(target.sum) == 0
    torch.testing.assert_close(target.covariance(), covariance, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(target.mean, source.mean)


def test_extending_a_centred_fit_equals_fitting_all_at_once():
    embedding = _embeddings(36)
    extended = _fit(embedding[:20], 6)
    extended.center()
    extended.update(embedding[20:])
    whole = _fit(embedding, 36)
    torch.testing.assert_close(
        extended.covariance(), whole.covariance(), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("channels", [5, 300])  # 300: upper-triangle updates
def test_complement_of_a_part_is_the_rest(channels):
    embedding = _embeddings(40, c=channels)
    whole = _fit(embedding, 9)
    part = _fit(embedding[::3], 4)  # images 0, 3, 6, ...
    rest = _fit(embedding[[i for i in range(40) if i % 3]], 40)
    scatter = whole.scatter.clone()
    part.complement(whole)

    assert part.count == rest.count == 26
    torch.testing.assert_close(part.mean, rest.mean, rtol=1e-6, atol=1e-5)
    expected = rest.covariance()
    # float32 sums: entries agree to a few roundings of the largest one
    atol = 1e-6 * float(expected.abs().max())
    torch.testing.assert_close(part.covariance(), expected, rtol=1e-5, atol=atol)
    assert torch.equal(whole.scatter, scatter)


def test_complement_takes_back_a_lent_scatter_first():
    embedding = _embeddings(30)
    whole, part = _fit(embedding, 30), _fit(embedding[:12], 12)
    gaussian = part.to_gaussian(lend=True)
    part.complement(whole)
    assert not gaussian.usable
    torch.testing.assert_close(
        part.covariance(), _fit(embedding[12:], 18).covariance(), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize(
    ("part", "message"),
    [
        (RunningGaussian.empty(6, 4), "cannot take statistics of shape"),
        (RunningGaussian.empty(6, 5), "cannot take 0 images out of 10"),
    ],
)
def test_complement_refuses_what_is_not_a_part(part, message):
    with pytest.raises(ValueError, match=message):
        part.complement(_fit(_embeddings(10), 10))


def test_one_image_warns_and_gives_finite_distances():
    stats = _fit(_embeddings(1), 1)
    with pytest.warns(FewImagesWarning, match="1 image"):
        gaussian = stats.to_gaussian()
    distances = gaussian.mahalanobis(_embeddings(3, seed=2))
    assert torch.isfinite(distances).all()
    # The covariance is the ridge alone: distance = |x - mean| / sqrt(ridge).
    assert gaussian.mahalanobis(_embeddings(1)).abs().max() < 1e-3


def test_fewer_images_than_channels_warns():
    with pytest.warns(FewImagesWarning, match="for 5 channels"):
        _fit(_embeddings(4), 4).to_gaussian()


def test_constant_images_give_finite_zero_distance():
    constant = torch.full((5, 4, 2, 2), 3.0)
    stats = _fit(constant, 2)
    gaussian = stats.to_gaussian()
    assert torch.equal(gaussian.mahalanobis(constant), torch.zeros(5, 2, 2))


@pytest.mark.parametrize(
    ("shape", "message"),
    [((2, 5, 3, 3), "does not match"), ((2, 4, 3, 2), "does not match")],
)
def test_wrong_embedding_shape_is_refused(shape, message):
    stats = RunningGaussian.empty(6, 5)
    with pytest.raises(ValueError, match=message):
        stats.update(torch.zeros(shape))


def test_merge_of_different_shapes_is_refused():
    with pytest.raises(ValueError, match="cannot merge"):
        RunningGaussian.empty(6, 5).merge(RunningGaussian.empty(6, 4))


def test_empty_statistics_cannot_be_used():
    with pytest.raises(ValueError, match="no images"):
        RunningGaussian.empty(6, 5).covariance()

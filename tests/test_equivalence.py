"""The optimised engine against a plain, obvious computation of the same maps.

The references here are written for clarity, not speed: a per-position numpy
covariance and inverse, an explicit Mahalanobis loop, a bilinear upsampling
and a mirrored Gaussian blur computed pixel by pixel, and an embedding that
upsamples every channel before choosing some.
"""

import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from padim_core import anomaly_map, gaussian
from padim_core.gaussian import COVARIANCE_RIDGE, RunningGaussian
from padim_core.model import Padim


def _embeddings(n: int, c: int = 6, h: int = 3, w: int = 4, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(n, c, h, w, generator=generator)
    mixing = torch.randn(c, c, generator=generator) / math.sqrt(c)
    return torch.einsum("nchw,dc->ndhw", base, mixing) + 3.0


def _fit(embedding: torch.Tensor, batch: int) -> RunningGaussian:
    n, c, h, w = embedding.shape
    stats = RunningGaussian.empty(h * w, c)
    for start in range(0, n, batch):
        stats.update(embedding[start : start + batch])
    return stats


def _plain_distances(train: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Mahalanobis distances (N, h, w) with numpy, one position at a time."""
    n, c, h, w = test.shape
    distances = np.zeros((n, h, w))
    for row in range(h):
        for column in range(w):
            x = train[:, :, row, column].astype(np.float64)
            mean = x.mean(axis=0)
            covariance = np.cov(x, rowvar=False) + COVARIANCE_RIDGE * np.eye(c)
            inverse = np.linalg.inv(covariance)
            for i in range(n):
                d = test[i, :, row, column] - mean
                distances[i, row, column] = math.sqrt(d @ inverse @ d)
    return distances


def _plain_bilinear(grid: np.ndarray, size: int) -> np.ndarray:
    """Resize axis 0 of ``grid`` to ``size``, sampling at pixel centres."""
    length = grid.shape[0]
    out = np.zeros((size, *grid.shape[1:]))
    for i in range(size):
        source = max((i + 0.5) * length / size - 0.5, 0.0)
        low = int(source)
        high = min(low + 1, length - 1)
        weight = source - low
        out[i] = (1 - weight) * grid[low] + weight * grid[high]
    return out


def _plain_blur(signal: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur along axis 0, mirrored edges, kernel cut at 4 sigma.

    Where the side is shorter than the kernel, the kernel is cut to the side
    and renormalised, as the engine does.
    """
    length = signal.shape[0]
    radius = min(int(4 * sigma + 0.5), length - 1)
    offsets = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 * (offsets / sigma) ** 2)
    weights /= weights.sum()
    out = np.zeros_like(signal)
    for i in range(length):
        for offset, weight in zip(offsets, weights, strict=True):
            j = i + offset
            j = -j if j < 0 else (2 * (length - 1) - j if j >= length else j)
            out[i] += weight * signal[j]
    return out


def _plain_maps(distances: np.ndarray, height: int, width: int) -> np.ndarray:
    maps = []
    for grid in distances:
        tall = _plain_bilinear(grid, height)
        full = _plain_bilinear(tall.T, width).T
        blurred = _plain_blur(full, anomaly_map.BLUR_SIGMA)
        maps.append(_plain_blur(blurred.T, anomaly_map.BLUR_SIGMA).T)
    return np.stack(maps)


@pytest.fixture(params=["whole", "panels"])
def panels(request, monkeypatch) -> str:
    """Scatter updates as whole products, or as upper panels for any width."""
    if request.param == "panels":
        monkeypatch.setattr(gaussian, "PANEL_MIN_CHANNELS", 1)
    return request.param


@pytest.mark.parametrize("lend", [False, True])
@pytest.mark.parametrize("batch", [1, 7, 40])
def test_distances_match_numpy_per_position(lend, batch, panels):
    train, test = _embeddings(40), _embeddings(5, seed=1)
    stats = _fit(train, batch)
    distances = stats.to_gaussian(lend=lend).mahalanobis(test)
    expected = _plain_distances(train.numpy(), test.numpy())
    np.testing.assert_allclose(distances.numpy(), expected, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("threads", [1, 2])
def test_worker_threads_give_the_same_distances(threads):
    train, test = _embeddings(30, c=9, h=5, w=7), _embeddings(4, c=9, h=5, w=7, seed=3)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        results = [_fit(train, 8).to_gaussian(lend=lend) for lend in (False, True)]
        distances = [result.mahalanobis(test) for result in results]
        assert torch.get_num_threads() == threads  # workers change only their own
    finally:
        torch.set_num_threads(before)
    expected = _plain_distances(train.numpy(), test.numpy())
    for found in distances:
        np.testing.assert_allclose(found.numpy(), expected, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize(
    ("grid", "size"), [((64, 64), (256, 256)), ((5, 7), (40, 56)), ((2, 3), (9, 13))]
)
def test_maps_match_pixel_by_pixel_upsampling_and_blur(grid, size):
    generator = torch.Generator().manual_seed(4)
    distances = torch.rand(2, *grid, generator=generator) * 10
    maps = anomaly_map.anomaly_maps(distances, size)
    expected = _plain_maps(distances.double().numpy(), *size)
    np.testing.assert_allclose(maps.numpy(), expected, rtol=0, atol=2e-5)


def test_maps_match_the_two_step_torch_computation():
    distances = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(5))
    upsampled = F.interpolate(
        distances.unsqueeze(1), size=(64, 64), mode="bilinear", align_corners=False
    )
    expected = anomaly_map.gaussian_blur(upsampled.squeeze(1))
    maps = anomaly_map.anomaly_maps(distances, (64, 64))
    torch.testing.assert_close(maps, expected, rtol=0, atol=1e-5)


def _plain_embedding(padim: Padim, images: torch.Tensor) -> torch.Tensor:
    """Upsample every channel of every layer, concatenate, then pick channels."""
    with torch.no_grad():
        features = padim.model.feature_extractor(images)
    layers = padim.config.layers
    grid = features[layers[0]].shape[-2:]
    full = torch.cat(
        [F.interpolate(features[layer], size=grid, mode="nearest") for layer in layers],
        dim=1,
    )
    return full[:, padim.model.channel_index]


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    generator = torch.Generator().manual_seed(6)
    return torch.randn(27, 3, 64, 64, generator=generator)


@pytest.mark.parametrize("lend", [False, True])
def test_resnet18_padim_matches_plain_padim(images, lend, panels, monkeypatch):
    if lend:
        monkeypatch.setattr(gaussian, "LEND_SCATTER_BYTES", 0)
    torch.manual_seed(0)
    padim = Padim("resnet18", pre_trained=False, n_features=12, image_size=64)
    train, test = images[:24], images[24:]
    for start in range(0, 24, 10):
        padim.partial_fit(train[start : start + 10])
    padim.finalize()
    assert padim.stats.lent == lend
    scores, distances, maps = padim.predict_tensor(test)

    plain_train = _plain_embedding(padim, train).numpy()
    plain_test = _plain_embedding(padim, test).numpy()
    expected = _plain_distances(plain_train, plain_test)
    np.testing.assert_allclose(distances.numpy(), expected, rtol=1e-4, atol=1e-4)
    expected_maps = _plain_maps(expected, 64, 64)
    np.testing.assert_allclose(maps.numpy(), expected_maps, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(scores.numpy(), expected_maps.max(axis=(1, 2)), 1e-4)


def test_lent_scatter_comes_back_bit_for_bit_where_it_is_read(panels):
    stats = _fit(_embeddings(25, c=8), 6)
    stats.center()  # as lending does first
    scatter = stats.scatter.clone()
    lent = stats.to_gaussian(lend=True)
    assert stats.lent and lent.usable
    assert torch.equal(stats.scatter_diagonal(), scatter.diagonal(dim1=1, dim2=2))

    assert torch.equal(stats.scatter.triu(), scatter.triu())
    assert torch.equal(stats.scatter, stats.scatter.mT)
    assert not stats.lent and not lent.usable
    with pytest.raises(RuntimeError, match="finalize again"):
        lent.mahalanobis(_embeddings(1, c=8))


def _merge_update_and_pickle(embedding: torch.Tensor, lend: bool) -> list:
    first, second = _fit(embedding[:12], 5), _fit(embedding[12:20], 4)
    for stats in (first, second):
        stats.to_gaussian(lend=lend)
    first.merge(second)
    first.to_gaussian(lend=lend)
    first.update(embedding[20:])
    first.to_gaussian(lend=lend)
    return [first, pickle.loads(pickle.dumps(first))]


@pytest.mark.filterwarnings("ignore::padim_core.gaussian.FewImagesWarning")
def test_updating_merging_and_pickling_take_the_loan_back(panels):
    embedding = _embeddings(30, c=8)
    plain = _merge_update_and_pickle(embedding, lend=False)
    lent = _merge_update_and_pickle(embedding, lend=True)

    for stats in lent + plain[1:]:
        assert not stats.lent
        assert torch.equal(stats.scatter.triu(), plain[0].scatter.triu())
        assert torch.equal(stats.covariance(), plain[0].covariance())
        assert torch.equal(stats.sum, plain[0].sum)
        assert stats.count == 30


def test_padim_scores_again_after_the_scatter_was_read(images, monkeypatch):
    monkeypatch.setattr(gaussian, "LEND_SCATTER_BYTES", 0)
    torch.manual_seed(0)
    padim = Padim("resnet18", pre_trained=False, n_features=8, image_size=64)
    padim.partial_fit(images[:20])
    padim.finalize()
    before = padim.predict_tensor(images[20:])[1]

    assert padim.stats.scatter is not None  # reading it, as saving does
    assert not padim.model.gaussian.usable
    after = padim.predict_tensor(images[20:])[1]
    torch.testing.assert_close(after, before, rtol=0, atol=0)


@pytest.mark.parametrize("batch", [1, 2, 5, 9])
def test_deviations_waiting_for_the_scatter_count_everywhere(
    batch, panels, monkeypatch
):
    # Up to 3 images wait, so every batch size here takes a different mix of
    # waiting, flushing and direct updates.
    monkeypatch.setattr(gaussian, "PENDING_MIN_IMAGES", 3)
    embedding = _embeddings(23, c=24, h=2, w=2)
    stats = _fit(embedding, batch)
    whole = _fit(embedding, 23)
    x = embedding.flatten(2).permute(2, 0, 1).double().numpy()  # (P, N, C)

    diagonal = stats.scatter_diagonal() - stats.sum**2 / stats.count
    np.testing.assert_allclose(diagonal.numpy(), x.var(axis=1) * 23, rtol=1e-4)
    restored = pickle.loads(pickle.dumps(stats))
    for found in (stats, restored):
        torch.testing.assert_close(
            found.covariance(), whole.covariance(), rtol=1e-5, atol=1e-5
        )
        torch.testing.assert_close(found.mean, whole.mean)
        found.center()  # the scatter itself depends on the reference point
        whole.center()
        torch.testing.assert_close(found.scatter, whole.scatter, rtol=1e-4, atol=1e-4)
        assert torch.equal(found.scatter, found.scatter.mT)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("value", [0.0, math.nan, math.inf, -math.inf, 3e38, -3e38])
def test_all_finite_agrees_with_isfinite(dtype, value):
    tensor = torch.randn(4, 5, 6).to(dtype)
    tensor[2, 3, 1] = value
    for view in (tensor, tensor.permute(2, 0, 1), tensor[:, 1::2]):
        assert gaussian.all_finite(view) == bool(torch.isfinite(view).all())


@pytest.mark.parametrize("backbone", ["resnet18", "efficientnet_lite0"])
@pytest.mark.parametrize("size", [64, 100, 45])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_embedding_equals_upsampling_every_channel_first(backbone, size, layout):
    torch.manual_seed(0)
    padim = Padim(backbone, pre_trained=False, n_features=30, image_size=size)
    images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(7))
    images = images.contiguous(memory_format=layout)  # to_tensor gives channels-last
    with torch.no_grad():
        embedding = padim.model.generate_embedding(
            padim.model.feature_extractor(images)
        )
    assert torch.equal(embedding, _plain_embedding(padim, images))
    assert torch.equal(
        gaussian.positions_first(embedding), embedding.flatten(2).permute(2, 0, 1)
    )


def test_an_uncommitted_room_is_dropped_and_commit_needs_a_room():
    embedding = _embeddings(12, c=8)
    stats = _fit(embedding[:6], 3)
    stats.reserve(2).fill_(1e6)  # abandoned, as when features are not finite
    stats.update(embedding[6:])
    whole = _fit(embedding, 12).covariance()
    torch.testing.assert_close(stats.covariance(), whole, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="nothing reserved"):
        stats.commit()


def test_embedding_written_into_a_given_buffer():
    torch.manual_seed(0)
    padim = Padim("resnet18", pre_trained=False, n_features=10, image_size=64)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        features = padim.model.feature_extractor(images)
    out = torch.empty(16, 16, 2, 10)
    embedding = padim.model.generate_embedding(features, out=out)
    assert embedding.data_ptr() == out.data_ptr()
    assert torch.equal(embedding, _plain_embedding(padim, images))
    with pytest.raises(ValueError, match=r"expected \(16, 16, 2, 10\)"):
        padim.model.generate_embedding(features, out=torch.empty(16, 16, 3, 10))


def test_all_finite_survives_a_sum_that_overflows():
    assert gaussian.all_finite(torch.full((3, 4), 3e38))
    assert not gaussian.all_finite(torch.tensor([3e38, 3e38, math.nan]))

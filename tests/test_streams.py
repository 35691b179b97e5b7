import math

import pytest
import torch
from scipy import stats

from flexar.sampling.streams import ImageStreams, _splitmix64, normal, uniform

MASK = (1 << 64) - 1


def splitmix64_reference(x: int) -> int:
    """SplitMix64's finaliser on Python ints (unbounded), reduced modulo 2^64."""
    x = (x + 0x9E3779B97F4A7C15) & MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK
    return x ^ (x >> 31)


def test_splitmix64_matches_the_unsigned_reference():
    values = [0, 1, 2, 12345, -1, -(1 << 63), (1 << 63) - 1, 0x0123456789ABCDEF]
    out = _splitmix64(torch.tensor(values, dtype=torch.long)).tolist()
    assert [v & MASK for v in out] == [splitmix64_reference(v & MASK) for v in values]


def test_an_image_stream_does_not_depend_on_the_batch():
    whole = ImageStreams(seed=3, indices=torch.arange(10))
    part = ImageStreams(seed=3, indices=torch.arange(6, 10))
    for shape in [(1,), (4,), (2, 3)]:
        a = whole.uniform((10, *shape))
        b = part.uniform((4, *shape))
        assert torch.equal(a[6:], b)


def test_streams_differ_by_seed_image_and_draw():
    streams = ImageStreams(seed=0, indices=torch.arange(4))
    first, second = streams.uniform((4, 8)), streams.uniform((4, 8))
    assert not torch.equal(first, second)
    assert len(set(first[:, 0].tolist())) == 4
    other = ImageStreams(seed=1, indices=torch.arange(4)).uniform((4, 8))
    assert not torch.equal(first, other)


def test_uniform_and_normal_laws():
    streams = ImageStreams(seed=7, indices=torch.arange(50))
    u = streams.uniform((50, 400)).flatten()
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert stats.kstest(u.numpy(), "uniform").pvalue > 1e-3
    u64 = streams.uniform((50, 10), dtype=torch.float64)
    assert u64.dtype == torch.float64 and float(u64.max()) < 1.0
    z = streams.normal((50, 400)).flatten()
    assert torch.isfinite(z).all()
    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-3


def test_image_major_multiples_and_bad_shapes():
    streams = ImageStreams(seed=0, indices=torch.arange(3))
    assert streams.uniform((6, 2)).shape == (6, 2)  # two copies per image, image-major
    with pytest.raises(ValueError, match="leading dimension"):
        streams.uniform((4, 2))


def test_helpers_accept_a_torch_generator_too():
    generator = torch.Generator().manual_seed(0)
    expected = torch.rand((2, 3), generator=torch.Generator().manual_seed(0))
    assert torch.equal(uniform(generator, (2, 3), torch.device("cpu")), expected)
    z = normal(torch.Generator().manual_seed(0), (2, 3), torch.device("cpu"))
    assert torch.equal(z, torch.randn((2, 3), generator=torch.Generator().manual_seed(0)))


def test_select_and_split_keep_each_stream_and_share_the_counter():
    streams, twin = ImageStreams(seed=5, indices=torch.arange(4)), ImageStreams(seed=5, indices=torch.arange(4))
    streams.uniform((4, 2)), twin.uniform((4, 2))
    subset = streams.select(torch.tensor([1, 3]))
    assert torch.equal(subset.uniform((2, 5)), twin.uniform((4, 5))[[1, 3]])
    assert streams.counter == twin.counter == 7  # drawing through the view advanced the parent
    copies = ImageStreams(seed=5, indices=torch.arange(2)).split(3)
    again = ImageStreams(seed=5, indices=torch.arange(1, 2)).split(3)
    drawn = copies.uniform((6, 4))
    assert torch.equal(drawn[3:], again.uniform((3, 4)))  # image 1's copies do not depend on image 0
    assert len({tuple(row) for row in drawn.tolist()}) == 6

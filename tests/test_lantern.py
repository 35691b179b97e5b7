import pytest
import torch
from scipy import stats

from flexar import Pipeline
from flexar.generators import RasterAR
from flexar.sampling import LanternDecoder, Sampler, SpeculativeDecoder, accept_drafts, neighbour_table, relaxed_target
from flexar.tokenizers import TiTok


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def tiny(vocab_size=12, max_tokens=8, dim=16, seed=0):
    torch.manual_seed(seed)
    return RasterAR(vocab_size=vocab_size, max_tokens=max_tokens, num_classes=3, dim=dim, depth=1, num_heads=2,
                    init_std=0.5).eval()


def codes(vocab_size=12, dim=3, seed=0):
    return torch.randn(vocab_size, dim, generator=seeded(seed))


def expected_acceptance(p, q, neighbours, delta, lam=None):
    """E[min(1, p~_x(x) / q(x))] over x ~ q, for one position."""
    drafts = torch.arange(p.shape[-1])
    relaxed, _ = relaxed_target(p.expand(len(drafts), -1), drafts, neighbours, delta, lam)
    return (q * torch.minimum(torch.ones_like(q), relaxed[drafts, drafts] / q)).sum().item()


def test_neighbour_table_excludes_self_and_is_sorted_by_distance():
    vectors = codes(20, 4)
    table = neighbour_table(vectors, 6)
    assert table.shape == (20, 6) and table.dtype == torch.long
    distances = torch.cdist(vectors.double(), vectors.double())
    for token in range(20):
        assert token not in table[token].tolist()
        row = distances[token, table[token]]
        assert (row.diff() >= 0).all()
        others = [t for t in range(20) if t != token and t not in table[token].tolist()]
        assert distances[token, others].min() >= row[-1]
    assert neighbour_table(vectors, 100).shape == (20, 19)


def test_relaxed_target_moves_exactly_b_and_respects_delta_and_lambda():
    p = torch.softmax(torch.randn(12, generator=seeded(1)), -1)
    table = neighbour_table(codes(), 5)
    for draft in range(12):
        for delta in (0.0, 0.05, 0.2):
            relaxed, in_b = relaxed_target(p, torch.tensor(draft), table, delta)
            moved = p[table[draft]][in_b]
            assert torch.isclose(relaxed.sum(), torch.tensor(1.0))
            assert (relaxed[table[draft]][in_b] == 0).all()
            assert relaxed[draft] == pytest.approx((p[draft] + moved.sum()).item())
            tv = 0.5 * (relaxed - p).abs().sum().item()
            assert tv == pytest.approx(moved.sum().item(), abs=1e-6) and tv <= delta + 1e-7
            if in_b.any():  # a prefix of the sorted row
                assert in_b[: int(in_b.sum())].all()
        relaxed, _ = relaxed_target(p, torch.tensor(draft), table, lam=2.0)
        assert relaxed[draft] <= 2.0 * p[draft] + 1e-7
    zero, _ = relaxed_target(p, torch.tensor(3), table, 0.0)
    assert torch.equal(zero, p)


def test_deterministic_draft_output_law_is_p_with_b_moved_to_x():
    p = torch.softmax(torch.randn(8, generator=seeded(2)), -1)
    table = neighbour_table(codes(8), 4)
    draft = 5
    relaxed, in_b = relaxed_target(p, torch.tensor(draft), table, delta=0.3)
    assert in_b.any() and 0.5 * (relaxed - p).abs().sum() <= 0.3
    count, generator = 30_000, seeded(3)
    q = torch.zeros(8).index_fill(0, torch.tensor([draft]), 1.0)
    drafts = torch.full((count, 1), draft)
    uniforms = torch.rand(count, 1, generator=generator)
    relaxed_rows, _ = relaxed_target(p.expand(count, 1, -1), drafts, table, 0.3)
    accepted, next_probs = accept_drafts(relaxed_rows, q.expand(count, 1, -1), drafts, uniforms, p.expand(count, -1))
    tokens = torch.where(accepted == 1, drafts[:, 0], torch.multinomial(next_probs, 1, generator=generator)[:, 0])
    observed = torch.bincount(tokens, minlength=8).double()
    support = relaxed > 0
    assert observed[~support].sum() == 0
    pvalue = stats.chisquare(observed[support].numpy(), (relaxed[support].double() * count).numpy()).pvalue
    assert pvalue > 1e-3


def test_official_rejection_removes_more_than_b():
    p = torch.softmax(torch.randn(8, generator=seeded(2)), -1)
    table = neighbour_table(codes(8), 4)
    decoder = LanternDecoder(tiny(8), neighbours=table, k=4, delta=0.05, rejection="official")
    exact = LanternDecoder(tiny(8), neighbours=table, k=4, delta=0.05)
    drafts = torch.tensor([[5]])
    relaxed, base = decoder.relax(p.view(1, 1, -1), drafts)
    assert torch.equal(relaxed, exact.relax(p.view(1, 1, -1), drafts)[0]) and exact.relax(p.view(1, 1, -1), drafts)[1] is None
    removed = [5] + table[5].tolist()
    assert (base[0, 0, removed] == 0).all() and (base[0, 0].sum() < relaxed[0, 0].sum() - relaxed[0, 0, 5])


def test_acceptance_is_non_decreasing_in_k_and_delta():
    generator = seeded(4)
    vectors = codes(16, 3)
    full = neighbour_table(vectors, 15)
    for trial in range(5):
        p = torch.softmax(2 * torch.randn(16, generator=generator), -1)
        q = torch.softmax(2 * torch.randn(16, generator=generator), -1)
        exact = float(torch.minimum(p, q).sum())
        assert expected_acceptance(p, q, full[:, :0], 0.3) == pytest.approx(exact)
        for delta in (0.0, 0.05, 0.1, 0.3):
            rates = [expected_acceptance(p, q, full[:, :k], delta) for k in (0, 1, 2, 4, 8, 15)]
            assert all(b >= a - 1e-7 for a, b in zip(rates, rates[1:]))
        for k in (1, 4, 15):
            rates = [expected_acceptance(p, q, full[:, :k], delta) for delta in (0.0, 0.02, 0.1, 0.3, 1.0)]
            assert all(b >= a - 1e-7 for a, b in zip(rates, rates[1:]))
            assert rates[0] == pytest.approx(exact)


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_delta_zero_is_exact_speculative_decoding_draw_for_draw(cfg_scale):
    target, draft = tiny(dim=16, seed=0), tiny(dim=8, seed=1)
    sampler = Sampler(cfg_scale=cfg_scale, top_k=10)
    labels = torch.tensor([0, 1, 2])
    table = neighbour_table(codes(), 5)
    exact = target.generate_with(labels, SpeculativeDecoder(draft, sampler, draft_length=3), seeded(9))
    relaxed = target.generate_with(labels, LanternDecoder(draft, sampler, 3, neighbours=table, delta=0.0), seeded(9))
    assert torch.equal(exact.ids, relaxed.ids)
    assert exact.stats["accepted"] == relaxed.stats["accepted"]


def test_lantern_accepts_more_and_runs_from_a_pipeline():
    torch.manual_seed(0)
    tokenizer = TiTok(image_size=16, channels=1, patch_size=4, num_latent_tokens=8, width=16, depth=1, num_heads=2,
                      codebook_size=12, code_dim=4).eval()
    target, draft = tiny(dim=16, seed=0), tiny(dim=8, seed=1)
    pipe = Pipeline(tokenizer, target)
    sampler = Sampler(cfg_scale=2.0)
    labels = [0, 1, 2] * 4
    _, exact_stats = pipe.generate(labels, sampler=SpeculativeDecoder(draft, sampler, 3), seed=0, return_stats=True)
    decoder = LanternDecoder(draft, sampler, 3, k=6, delta=0.4)
    images, stats_ = pipe.generate(labels, sampler=decoder, seed=0, return_stats=True)
    assert images.shape == (12, 3, 16, 16) and decoder.neighbours.shape == (12, 6)
    assert torch.equal(decoder.neighbours, neighbour_table(tokenizer.code_vectors(), 6))
    assert stats_["forward_passes"] <= exact_stats["forward_passes"]
    with pytest.raises(ValueError, match="neighbour table"):
        target.generate_with(torch.tensor([0]), LanternDecoder(draft, sampler), seeded())
    with pytest.raises(ValueError, match="lambda"):
        LanternDecoder(draft, lam=0.5)

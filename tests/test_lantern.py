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


def official_rejection(p, x, table, k, delta):
    """LANTERN's official relaxed acceptance for one deterministic draft ``x`` (ea_model_llamagen.py,
    ``evaluate_posterior``, where a draft is verified with q(x) = 1), line by line: returns (p~(x), the distribution
    the next token is drawn from after a rejection). ``table`` has the diagonal at infinity: x is not in its row."""
    gtp = p.clone()
    nearest_probs = gtp[table[x, :k]]
    cumsum_nearest_probs = torch.cumsum(nearest_probs, dim=0)
    indices = (cumsum_nearest_probs <= delta).nonzero(as_tuple=True)[0]
    indices = -1 if indices.numel() == 0 else indices[-1]
    px = (gtp[x] if indices == -1 else gtp[x] + cumsum_nearest_probs[indices]).item()  # read before gtp changes
    gtp[x] = 0
    if indices != -1:
        gtp[table[x, : k + 1]] = 0
    if gtp.sum() == 0:
        gtp = torch.ones_like(gtp)
    return px, gtp / gtp.sum()


def rejected_draft(decoder, p, x):
    """(p~(x), next-token distribution) of flexar's decoder when the deterministic draft x is rejected."""
    vocabulary_size = p.shape[-1]
    q = torch.zeros(1, 1, vocabulary_size, dtype=p.dtype).index_fill(-1, torch.tensor([x]), 1.0)
    drafts = torch.tensor([[x]])
    acceptance, base = decoder.relax(p.view(1, 1, -1), drafts)
    # u just below 1 rejects every draft with p~(x) < 1
    uniforms = torch.full((1, 1), 1.0 - 1e-12, dtype=p.dtype)
    accepted, next_probs = accept_drafts(acceptance, q, drafts, uniforms, p.view(1, -1), base, decoder.uniform_fallback)
    assert accepted.item() == 0
    return acceptance[0, 0, x], next_probs[0]


def official_decoder(table, k, delta):
    return LanternDecoder(tiny(table.shape[0]), neighbours=table, k=k, delta=delta, rejection="official")


def test_official_rejection_keeps_the_neighbours_when_b_is_empty():
    table = neighbour_table(codes(8), 7)
    x, k, delta = 5, 3, 0.05
    # the nearest neighbour alone holds more than delta: B is empty, and the official code zeroes only x
    p = torch.full((8,), 0.5 / 7, dtype=torch.float64)
    p[table[x, 0]], p[x] = 0.2, 0.3
    p = p / p.sum()
    px, reference = official_rejection(p, x, table, k, delta)
    acceptance, next_probs = rejected_draft(official_decoder(table, k, delta), p, x)
    assert acceptance == pytest.approx(px) == pytest.approx(p[x].item())
    torch.testing.assert_close(next_probs, reference)
    assert (next_probs[table[x, :k]] > 0).all()


def test_official_rejection_zeroes_the_k_plus_one_nearest_neighbours():
    table = neighbour_table(codes(10), 9)
    x, k, delta = 2, 3, 0.1
    p = torch.full((10,), 1.0, dtype=torch.float64)
    p[table[x, 0]] = 0.01  # B = the nearest neighbour only
    p = p / p.sum()
    px, reference = official_rejection(p, x, table, k, delta)
    acceptance, next_probs = rejected_draft(official_decoder(table, k, delta), p, x)
    assert acceptance.item() == pytest.approx(px)
    torch.testing.assert_close(next_probs, reference)
    # x and its k + 1 nearest neighbours lose their mass; the (k + 2)-th keeps it
    assert (next_probs[[x] + table[x, : k + 1].tolist()] == 0).all() and next_probs[table[x, k + 1]] > 0


def test_official_rejection_falls_back_to_uniform_when_the_residual_is_empty():
    table = neighbour_table(codes(8), 7)
    x, k, delta = 1, 2, 0.3
    # all mass on x and its k + 1 nearest neighbours, B non-empty: nothing is left after the official removal
    p = torch.zeros(8, dtype=torch.float64)
    p[x], p[table[x, 0]], p[table[x, 1]], p[table[x, 2]] = 0.4, 0.1, 0.1, 0.4
    px, reference = official_rejection(p, x, table, k, delta)
    acceptance, next_probs = rejected_draft(official_decoder(table, k, delta), p, x)
    assert acceptance.item() == pytest.approx(px) == pytest.approx(0.6)
    torch.testing.assert_close(next_probs, torch.full((8,), 1 / 8, dtype=torch.float64))
    torch.testing.assert_close(next_probs, reference)


def test_official_rejection_matches_the_official_code_on_random_targets():
    generator = seeded(11)
    table = neighbour_table(codes(16, 3), 15)
    for trial in range(40):
        p = torch.softmax(3 * torch.randn(16, generator=generator, dtype=torch.float64), -1)
        k, delta = (1, 2, 4, 8)[trial % 4], (0.02, 0.1, 0.3)[trial % 3]
        decoder = official_decoder(table, k, delta)
        for x in range(16):
            if p[x] > 0.9:
                continue
            px, reference = official_rejection(p, x, table, k, delta)
            acceptance, next_probs = rejected_draft(decoder, p, x)
            assert acceptance.item() == pytest.approx(px)
            torch.testing.assert_close(next_probs, reference)


def test_official_rejection_needs_k_plus_one_columns():
    table = neighbour_table(codes(8), 3)
    with pytest.raises(ValueError, match=r"k \+ 1 = 4 nearest neighbours"):
        LanternDecoder(tiny(8), neighbours=table, k=3, rejection="official")
    assert LanternDecoder(tiny(8), neighbours=neighbour_table(codes(8), 7), k=3, rejection="official").neighbours.shape == (8, 4)
    # the whole table (V - 1 columns) is enough for any k, as in the official code's slicing; k = 0 needs none
    LanternDecoder(tiny(8), neighbours=neighbour_table(codes(8), 7), k=7, rejection="official")
    LanternDecoder(tiny(8), neighbours=neighbour_table(codes(8), 0), k=0, rejection="official")


def test_a_draft_without_target_mass_is_never_accepted():
    # p(x) = 0 and u = 0: the official rule r <= p / q would accept it
    p = torch.tensor([[[0.0, 0.5, 0.5]]])
    q = torch.tensor([[[0.5, 0.25, 0.25]]])
    drafts, zero = torch.tensor([[0]]), torch.zeros(1, 1)
    accepted, next_probs = accept_drafts(p, q, drafts, zero, p[:, 0])
    assert accepted.item() == 0 and next_probs[0, 0] == 0
    # the same for LANTERN's relaxed target when x borrows nothing (its neighbours have no mass either)
    table = torch.tensor([[1, 2], [0, 2], [0, 1]])
    p = torch.tensor([[[0.0, 0.0, 1.0]]])
    for rejection in ("exact", "official"):
        decoder = LanternDecoder(tiny(3), neighbours=table, k=1, delta=0.1, rejection=rejection)
        relaxed, base = decoder.relax(p, drafts)
        assert relaxed[0, 0, 0] == 0
        accepted, _ = accept_drafts(relaxed, q, drafts, zero, p[:, 0], base, decoder.uniform_fallback)
        assert accepted.item() == 0


def position_law(decoder, p, q):
    """Exact law (V,) of the token committed at one position when one draft x ~ q is verified against p."""
    vocabulary_size = p.shape[-1]
    drafts = torch.arange(vocabulary_size).view(-1, 1)
    acceptance, base = decoder.relax(p.expand(vocabulary_size, 1, -1).clone(), drafts)
    draft_probs = q.expand(vocabulary_size, 1, -1)
    # u = 1 rejects every draft that is not accepted with certainty, which exposes its residual
    ones = torch.ones(vocabulary_size, 1, dtype=p.dtype)
    _, residual = accept_drafts(acceptance, draft_probs, drafts, ones, p.expand(vocabulary_size, -1), base,
                                decoder.uniform_fallback)
    accept = torch.minimum(torch.ones_like(q), acceptance[drafts[:, 0], 0, drafts[:, 0]] / q)
    return q * accept + ((q * (1 - accept)).unsqueeze(-1) * residual).sum(0)


def test_sampled_draft_law_is_the_mixture_over_drafts():
    generator = seeded(5)
    table = neighbour_table(codes(8), 4)
    p = torch.softmax(torch.randn(8, generator=generator, dtype=torch.float64), -1)
    q = torch.softmax(torch.randn(8, generator=generator, dtype=torch.float64), -1)
    decoder = LanternDecoder(tiny(8), neighbours=table, k=4, delta=0.2)
    law = position_law(decoder, p, q)
    assert law.sum().item() == pytest.approx(1.0) and 0.5 * (law - p).abs().sum() > 0.2
    count = 30_000
    drafts = torch.multinomial(q, count, replacement=True, generator=generator).view(count, 1)
    relaxed, base = decoder.relax(p.expand(count, 1, -1), drafts)
    uniforms = torch.rand(count, 1, generator=generator, dtype=torch.float64)
    accepted, next_probs = accept_drafts(relaxed, q.expand(count, 1, -1), drafts, uniforms, p.expand(count, -1), base)
    tokens = torch.where(accepted == 1, drafts[:, 0], torch.multinomial(next_probs, 1, generator=generator)[:, 0])
    observed = torch.bincount(tokens, minlength=8).double()
    assert stats.chisquare(observed.numpy(), (law * count).numpy()).pvalue > 1e-3


def test_tv_bound_holds_for_deterministic_drafts_only():
    # the module docstring's measurement, smaller: V = 64 codes, k = 8, delta = 0.1, unrelated draft
    generator = seeded(0)
    delta, ratios, deterministic = 0.1, [], []
    for _ in range(40):
        table = neighbour_table(torch.randn(64, 4, generator=generator), 9)
        exact = LanternDecoder(tiny(64), neighbours=table, k=8, delta=delta)
        p = torch.softmax(2 * torch.randn(64, generator=generator, dtype=torch.float64), -1)
        q = torch.softmax(2 * torch.randn(64, generator=generator, dtype=torch.float64), -1)
        ratios.append(0.5 * (position_law(exact, p, q) - p).abs().sum().item() / delta)
        x = int(torch.multinomial(q, 1, generator=generator))
        one_hot = torch.zeros(64, dtype=torch.float64).index_fill(0, torch.tensor([x]), 1.0)
        relaxed, _ = relaxed_target(p, torch.tensor(x), table[:, :8], delta)
        law = position_law(exact, p, one_hot)
        torch.testing.assert_close(law, relaxed)  # a deterministic draft commits a token of p~ exactly
        deterministic.append(0.5 * (law - p).abs().sum().item() / delta)
        assert position_law(exact, p, p).sub(p).abs().max() < 1e-12  # a perfect draft keeps p
    ratios = torch.tensor(ratios)
    assert max(deterministic) <= 1 + 1e-9
    assert (ratios > 1).float().mean() > 0.9 and ratios.max() > 3


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
    # the official rejection reads one neighbour more than B can hold
    official = LanternDecoder(draft, sampler, 3, k=6, delta=0.4, rejection="official")
    assert pipe.generate(labels[:3], sampler=official, seed=0).shape == (3, 3, 16, 16)
    assert torch.equal(official.neighbours, neighbour_table(tokenizer.code_vectors(), 7))
    with pytest.raises(ValueError, match="neighbour table"):
        target.generate_with(torch.tensor([0]), LanternDecoder(draft, sampler), seeded())
    with pytest.raises(ValueError, match="lambda"):
        LanternDecoder(draft, lam=0.5)

import pytest
import torch

from flexar.nn import (
    KVCache,
    Mask,
    RotaryEmbedding,
    Transformer,
    apply_rotary,
    attention,
    block_causal_mask,
    causal_mask,
    dense_to_mask,
    grid_positions,
)

BACKENDS = ["sdpa", "flex", "xformers", "auto"]


def _qkv(length=48, kv_length=None, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 3, length, 16, generator=generator)
    k = torch.randn(2, 3, kv_length or length, 16, generator=generator)
    v = torch.randn(2, 3, kv_length or length, 16, generator=generator)
    return q, k, v


def _masks(length):
    generator = torch.Generator().manual_seed(1)
    arbitrary = torch.rand(length, length, generator=generator) < 0.5
    arbitrary[:, 0] = True  # no fully masked row (softmax of an empty row is undefined)
    blocks = torch.arange(length) // 8
    rows, cols = grid_positions(6, 8).unbind(-1)
    neighbourhood = Mask(lambda q, kv: ((rows[q] - rows[kv]).abs() <= 1) & ((cols[q] - cols[kv]).abs() <= 1), "nbhd")
    return {
        "none": None,
        "causal": causal_mask(),
        "bool": arbitrary,
        "bool_as_mask": dense_to_mask(arbitrary),
        "block_causal": block_causal_mask(blocks),
        "neighbourhood": neighbourhood,
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask_name", ["none", "causal", "bool", "bool_as_mask", "block_causal", "neighbourhood"])
def test_backends_match_math(backend, mask_name):
    q, k, v = _qkv()
    mask = _masks(q.shape[-2])[mask_name]
    reference = attention(q, k, v, mask, backend="math")
    out = attention(q, k, v, mask, backend=backend)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["math", "sdpa", "flex"])
def test_query_offset_selects_rows_of_full_mask(backend):
    q, k, v = _qkv()
    for mask in (causal_mask(), block_causal_mask(torch.arange(48) // 8)):
        full = attention(q, k, v, mask, backend="math")
        tail = attention(q[:, :, 40:], k, v, mask, backend=backend, q_offset=40)
        torch.testing.assert_close(tail, full[:, :, 40:], atol=1e-5, rtol=1e-5)


def test_mask_semantics():
    dense = causal_mask().dense(4, 4)
    assert torch.equal(dense, torch.tril(torch.ones(4, 4, dtype=torch.bool)))
    blocks = block_causal_mask(torch.tensor([0, 0, 1, 1])).dense(4, 4)
    assert blocks[0, 1] and not blocks[1, 2] and blocks[3, 0]


def test_bad_inputs():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention(q, k, v, backend="fast")
    with pytest.raises(ValueError, match=r"\(B, H, L, D\)"):
        attention(q[0], k[0], v[0])
    with pytest.raises(TypeError, match="bool"):
        attention(q, k, v, mask=torch.zeros(48, 48), backend="sdpa")


def test_rope_is_relative_and_identity_at_negative_positions():
    rope = RotaryEmbedding(16, axes=2)
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 1, 16, generator=generator).expand(1, 1, 2, 16)
    k = torch.randn(1, 1, 1, 16, generator=generator).expand(1, 1, 2, 16)
    # scores depend only on the offset between positions
    pos_a = torch.tensor([[1, 2], [3, 5]])
    pos_b = torch.tensor([[4, 4], [6, 7]])
    score = lambda pos: (apply_rotary(q, *rope(pos))[..., 1, :] * apply_rotary(k, *rope(pos))[..., 0, :]).sum()
    torch.testing.assert_close(score(pos_a), score(pos_b))
    cos, sin = rope(torch.tensor([[-1, -1]]))
    assert torch.all(cos == 1) and torch.all(sin == 0)


@pytest.mark.parametrize("cond_dim", [None, 8])
def test_kv_cache_decoding_equals_full_recompute(cond_dim):
    torch.manual_seed(0)
    model = Transformer(dim=32, depth=3, num_heads=4, cond_dim=cond_dim).eval()
    if cond_dim is not None:  # AdaLN-zero starts at identity: give the modulation weights something to do
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.out_features in (6 * 32, 2 * 32):
                torch.nn.init.normal_(module.weight, std=0.05)
    rope = RotaryEmbedding(8, axes=2)
    length = 20
    x = torch.randn(2, length, 32)
    cond = torch.randn(2, cond_dim) if cond_dim else None
    positions = grid_positions(4, 5)
    full = model(x, causal_mask(), rope(positions), cond)
    cache = model.new_cache(batch_size=2, max_length=length)
    pieces = []
    start = 0
    for size in (5, 1, 1, 3, 10):  # a prefill then uneven steps
        chunk = slice(start, start + size)
        pieces.append(model(x[:, chunk], causal_mask(), rope(positions[chunk]), cond, kv_cache=cache))
        start += size
    assert cache.length == length
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_kv_cache_bounds_and_truncate():
    cache = KVCache(1, 1, 1, 4, 2)
    cache.update(0, torch.ones(1, 1, 3, 2), torch.ones(1, 1, 3, 2))
    cache.advance(3)
    with pytest.raises(ValueError, match="holds 4 positions"):
        cache.update(0, torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 2))
    cache.truncate(1)
    assert cache.length == 1
    with pytest.raises(ValueError):
        cache.truncate(3)


def test_kv_cache_rows_of_different_lengths_per_row_advance_and_truncate():
    cache = KVCache(2, 3, 1, 6, 2)
    keys = torch.arange(3 * 4 * 2, dtype=torch.float32).view(3, 1, 4, 2)
    for layer in range(2):
        full_keys, _ = cache.update(layer, keys, keys)
    assert full_keys.shape == (3, 1, 6, 2)  # the whole static buffer, never a slice
    cache.advance(torch.tensor([1, 4, 2]))
    assert cache.lengths.tolist() == [1, 4, 2] and cache.ragged
    with pytest.raises(ValueError, match=r"different lengths \[1, 4, 2\].*kv_cache.lengths"):
        cache.length
    assert cache.positions(2).tolist() == [[1, 2], [4, 5], [2, 3]]
    # a forward pass addresses rows one by one only while they differ, and never past the model's positions
    assert cache.step_positions(2, limit=6).tolist() == [[1, 2], [4, 5], [2, 3]]
    with pytest.raises(ValueError, match="input reaches position 6, past the 5 positions"):
        cache.step_positions(2, limit=5)
    assert KVCache(1, 2, 1, 4, 2).step_positions(1) is None
    empty_row = KVCache(1, 2, 1, 4, 2)
    empty_row.advance(torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="must hold a prefix"):
        empty_row.step_positions(1)
    assert empty_row.step_positions(1, prefix=False).tolist() == [[0], [2]]
    # each row writes at its own positions, in place; what it wrote past its length stays invisible
    new = torch.full((3, 1, 2, 2), -1.0)
    buffer, _ = cache.update(0, new, new)
    assert buffer[0, 0, 1:3].eq(-1).all() and buffer[1, 0, 4:6].eq(-1).all() and buffer[2, 0, 2:4].eq(-1).all()
    assert torch.equal(buffer[1, 0, :4], keys[1, 0])
    allowed = cache.attention_mask(causal_mask(), 2)[:, 0]
    assert allowed.shape == (3, 2, 6)
    assert allowed[0].tolist() == [[True, True, False, False, False, False], [True, True, True, False, False, False]]
    assert allowed[1, 0].tolist() == [True] * 5 + [False]
    with pytest.raises(ValueError, match="holds 6 positions; writing up to position 7"):
        cache.update(0, torch.ones(3, 1, 3, 2), torch.ones(3, 1, 3, 2))
    cache.truncate(torch.tensor([1, 2, 2]))
    assert cache.lengths.tolist() == [1, 2, 2]
    with pytest.raises(ValueError, match="cannot truncate rows"):
        cache.truncate(torch.tensor([2, 2, 2]))
    cache.select(torch.tensor([2, 1]))
    assert cache.lengths.tolist() == [2, 2] and cache.length == 2 and not cache.ragged
    with pytest.raises(ValueError, match="one count per row"):
        cache.advance(torch.tensor([1, 1, 1]))


def test_raster_decoding_over_rows_of_different_lengths_equals_each_rows_full_recompute():
    from flexar.generators import RasterAR

    torch.manual_seed(0)
    model = RasterAR(vocab_size=16, max_tokens=8, num_classes=3, dim=32, depth=2, num_heads=4, init_std=0.3).eval()
    ids = torch.randint(0, 16, (3, 8))
    labels = torch.tensor([0, 2, 1])

    def reference(row: int, tokens: int) -> torch.Tensor:
        """Logits of the token after the first `tokens` ids of `row`, from a full forward of that row alone."""
        return model(ids[row : row + 1, :tokens], labels[row : row + 1])[0, -1]

    with torch.no_grad():
        run = model.start_decoding(labels, 1, 9)
        run.start()
        counts = torch.tensor([2, 5, 3])
        padded = run.feed(ids[:, :5], counts=counts)  # every row fed five ids, each keeps its own count
        assert run.lengths.tolist() == [3, 6, 4]
        for row, count in enumerate(counts.tolist()):
            torch.testing.assert_close(padded[row, count - 1], reference(row, count), atol=1e-5, rtol=1e-5)
        # one more id per row, each at its own position
        nxt = ids.gather(1, counts[:, None])
        step = run.feed(nxt)[:, -1]
        for row, count in enumerate(counts.tolist()):
            torch.testing.assert_close(step[row], reference(row, count + 1), atol=1e-5, rtol=1e-5)
        # roll rows back by different amounts and continue
        run.truncate(torch.tensor([2, 3, 5]))
        kept = run.lengths - 1  # ids held per row: 1, 2, 4
        step = run.feed(ids.gather(1, kept[:, None]))[:, -1]
        for row, count in enumerate(kept.tolist()):
            torch.testing.assert_close(step[row], reference(row, count + 1), atol=1e-5, rtol=1e-5)


def test_adaln_zero_starts_as_identity_per_block():
    from flexar.nn import Block

    block = Block(16, 2, cond_dim=4)
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(block(x, cond=torch.randn(2, 4)), x)


def test_auto_uses_flex_attention_only_when_compiled_flex_attention_is_on():
    from flexar.nn.attention import auto_backend, flex_compile_enabled, resolve_backend, set_flex_compile

    structured = block_causal_mask(torch.arange(8) // 2)
    dense = torch.ones(8, 8, dtype=torch.bool)
    # eager FlexAttention is slower than SDPA with a dense mask on every device: auto picks it only when compiled
    assert auto_backend("cuda", structured, flex_compiled=False) == "sdpa"
    assert auto_backend("cuda", structured, flex_compiled=True) == "flex"
    for device_type in ("cpu", "cuda"):
        for mask in (None, causal_mask(), dense):
            assert auto_backend(device_type, mask, flex_compiled=True) == "sdpa"
    assert auto_backend("cpu", structured, flex_compiled=True) == "sdpa"
    # resolve_backend reads the process-wide switch
    q = torch.zeros(1, 1, 8, 4)
    assert not flex_compile_enabled()
    try:
        set_flex_compile(True)
        assert flex_compile_enabled() and resolve_backend("auto", q, structured) == "sdpa"  # a CPU tensor
    finally:
        set_flex_compile(False)
    assert resolve_backend("flex", q, structured) == "flex" and resolve_backend("auto", q, structured) == "sdpa"

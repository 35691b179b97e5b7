"""Low-precision pipelines: every family generates in bf16, and sampling arithmetic stays float32."""
import pytest
import torch

from flexar import Pipeline
from flexar.generators import MVAR, NAR, NPP, VAR, XAR, EagleDraftHead, RasterAR, TokenShuffleAR
from flexar.sampling import (BestOfN, EntropySampler, FlowSampler, LanternDecoder, Sampler, ScalingAR,
                             SpeculativeDecoder, neighbour_table)
from flexar.tokenizers import VAE, VQGAN2D, FlexTok, MultiScaleVQ, OneDPiece, ReTok, TiTok


def tiny_pair(family: str):
    """A (tokenizer, generator) pair of tiny untrained models that a Pipeline accepts."""
    torch.manual_seed(0)
    if family in ("titok", "flextok", "onedpiece", "retok"):
        cls = {"titok": TiTok, "flextok": FlexTok, "onedpiece": OneDPiece, "retok": ReTok}[family]
        sizes = dict(image_size=16, channels=1, patch_size=4, num_latent_tokens=6, codebook_size=32, code_dim=8)
        if family == "flextok":
            sizes = dict(image_size=16, channels=1, patch_size=4, num_registers=8, width=32, depth=1, num_heads=2,
                         decoder_width=32, decoder_depth=1, decoder_heads=2)
        else:
            sizes.update(width=32, depth=1, num_heads=2, **({"redundant_tokens": 3} if family == "retok" else {}))
        tokenizer = cls(**sizes)
        generator = RasterAR(vocab_size=tokenizer.codebook_size, max_tokens=tokenizer.max_tokens, num_classes=10,
                             dim=32, depth=1, num_heads=2)
    elif family in ("nar", "npp", "token_shuffle"):
        tokenizer = VQGAN2D.from_preset("vq2d-tiny", image_size=16, channels=1)
        cls = {"nar": NAR, "npp": NPP, "token_shuffle": TokenShuffleAR}[family]
        generator = cls(vocab_size=tokenizer.codebook_size, max_tokens=tokenizer.max_tokens, grid=tokenizer.grid,
                        num_classes=10, dim=32, depth=1, num_heads=2)
    elif family in ("var", "mvar"):
        tokenizer = MultiScaleVQ.from_preset("msvq-tiny")
        generator = (VAR if family == "var" else MVAR).from_preset(f"{family}-tiny")
        generator.load_tokenizer(tokenizer)
    elif family == "xar":
        tokenizer = VAE(image_size=16, channels=1, latent_channels=2, block_out_channels=[8, 8], layers_per_block=1,
                        norm_num_groups=4, mid_block_attention=False)
        generator = XAR.from_preset("xar-tiny", latent_channels=2, latent_size=tokenizer.latent_size, num_classes=10)
    else:
        raise KeyError(family)
    return tokenizer.eval(), generator.eval()


FAMILIES = ["titok", "flextok", "onedpiece", "retok", "nar", "npp", "token_shuffle", "var", "mvar", "xar"]


def floating_dtypes(pipe: Pipeline) -> set:
    """The dtypes of every floating parameter and buffer, except the rotary tables (float32 in every model)."""
    modules = [pipe.tokenizer, pipe.generator] + ([pipe.draft] if pipe.draft is not None else [])
    return {tensor.dtype for module in modules for name, tensor in [*module.named_parameters(), *module.named_buffers()]
            if tensor.is_floating_point() and not name.endswith("inv_freq")}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_generates_in_bf16_from_a_saved_pipeline(family, tmp_path):
    tokenizer, generator = tiny_pair(family)
    Pipeline(tokenizer, generator, check_provenance=False).save_pretrained(tmp_path / "pipe")
    pipe = Pipeline.from_pretrained(tmp_path / "pipe", check_provenance=False, dtype=torch.bfloat16)
    assert pipe.dtype == torch.bfloat16 and floating_dtypes(pipe) == {torch.bfloat16}
    sampler = FlowSampler(steps=2, cfg_scale=2.0) if generator.continuous else Sampler(cfg_scale=2.0, top_k=8)
    images = pipe.generate([0, 3], sampler=sampler, seed=0, output_type="pt")
    assert images.dtype == torch.float32 and images.shape == (2, 3, 16, 16)
    assert torch.isfinite(images).all() and 0 <= images.min() and images.max() <= 1
    # integer buffers (counters, flags) keep their dtype
    assert all(not buffer.is_floating_point() for name, buffer in pipe.generator.named_buffers()
               if name in ("train_steps", "quantizer_loaded"))


def test_bf16_pipeline_runs_every_decoding_strategy(tmp_path):
    tokenizer, target = tiny_pair("titok")
    draft = RasterAR(vocab_size=target.vocab_size, max_tokens=target.max_tokens, num_classes=10, dim=16, depth=1,
                     num_heads=2).eval()
    target.save_pretrained(tmp_path / "target")
    pipe = Pipeline(tokenizer, target, check_provenance=False, draft=draft).to(torch.bfloat16)
    assert floating_dtypes(pipe) == {torch.bfloat16}
    head = EagleDraftHead(target=str(tmp_path / "target"), num_heads=2).eval().to(torch.bfloat16)
    sampler = Sampler(cfg_scale=2.0)
    table = neighbour_table(tokenizer.code_vectors(), 2)
    strategies = [sampler, EntropySampler(cfg_scale=2.0), SpeculativeDecoder(pipe.draft, sampler, 2),
                  SpeculativeDecoder(head, sampler, 2), LanternDecoder(pipe.draft, sampler, 2, neighbours=table, k=2),
                  ScalingAR(sampler, 2, checkpoints=[0.5]), BestOfN(sampler, 2)]
    for strategy in strategies:
        images = pipe.generate([0, 1, 2], sampler=strategy, seed=1, output_type="pt")
        assert images.shape == (3, 3, 16, 16) and torch.isfinite(images).all(), type(strategy).__name__


def test_sampling_arithmetic_is_float32_for_low_precision_logits():
    torch.manual_seed(0)
    logits = (torch.randn(4, 3, 50) * 4).to(torch.bfloat16)  # [conditional; unconditional] rows under CFG
    sampler = Sampler(temperature=0.7, top_k=20, top_p=0.9, cfg_scale=3.0)
    processed = sampler.process(logits)
    assert processed.dtype == torch.float32
    # the same as processing the float32 upcast: nothing is rounded to bf16 on the way
    assert torch.equal(processed, sampler.process(logits.float()))
    assert torch.equal(sampler.probs(logits), sampler.probs(logits.float()))
    stream = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    assert torch.equal(sampler.sample(logits, generator=stream()), sampler.sample(logits.float(), generator=stream()))
    # a guided logit computed in bf16 would differ: the check above can fail
    conditional, unconditional = logits.chunk(2)
    in_bf16 = unconditional + 3.0 * (conditional - unconditional)
    assert not torch.equal(in_bf16.float(), unconditional.float() + 3.0 * (conditional.float() - unconditional.float()))


def test_pipeline_to_refuses_an_integer_dtype_and_keeps_devices():
    tokenizer, generator = tiny_pair("titok")
    pipe = Pipeline(tokenizer, generator, check_provenance=False)
    with pytest.raises(ValueError, match="floating-point dtype.*torch.int64"):
        pipe.to(torch.int64)
    assert pipe.to("cpu", torch.float16).dtype == torch.float16 and pipe.device.type == "cpu"
    assert pipe.to(dtype=torch.float32).dtype == torch.float32


def test_rotary_tables_stay_float32_in_a_bf16_model():
    from flexar.nn import RotaryEmbedding

    rope = RotaryEmbedding(64, axes=2)
    reference = rope(torch.tensor([[23, 23], [0, 5]]))
    rope.to(torch.bfloat16)
    assert rope.inv_freq.dtype == torch.float32
    for expected, got in zip(reference, rope(torch.tensor([[23, 23], [0, 5]]))):
        assert torch.equal(expected, got)  # a bf16 inv_freq moves these cosines by ~3e-3
    rope.double()
    assert rope.inv_freq.dtype == torch.float32

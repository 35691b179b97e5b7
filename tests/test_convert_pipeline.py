"""Pipelines from converted parts: a LlamaGen VQ and GPT pair, bound by the tokenizer folder at conversion."""
import pytest
import torch

from flexar import Pipeline
from flexar.cli.convert import main as convert_main
from flexar.convert import convert, record_tokenizer
from flexar.convert import llamagen_gpt, llamagen_vq
from flexar.hub import fingerprint, save_model
from flexar.sampling import Sampler

import test_convert_llamagen_gpt as gpt_official
import test_convert_llamagen_vq as vq_official

# the tiny VQ of the official layout: 32 px, f4 -> an 8 x 8 grid of 64 codes; a GPT over the same grid and codes
VQ = vq_official.TINY
GPT = dict(dim=32, n_layer=2, n_head=2, vocab_size=VQ["codebook_size"], num_classes=5, grid_size=8)
GPT_OVERRIDES = dict(dim=32, depth=2, num_heads=2, vocab_size=VQ["codebook_size"], num_classes=5)


@pytest.fixture
def tiny_presets(monkeypatch):
    monkeypatch.setitem(llamagen_vq.PRESETS, "vq-test", VQ)
    monkeypatch.setitem(llamagen_gpt.PRESETS, "gpt-test", {**llamagen_gpt.PRESETS["gpt-b"], **GPT_OVERRIDES})


def test_two_converted_folders_make_a_checked_pipeline_that_saves_and_reloads(tmp_path, capsys, tiny_presets):
    vq_file = vq_official.save_like_vq_train(vq_official.official_state_dict(**VQ), tmp_path / "vq.pt")
    torch.save({"model": gpt_official.official_state_dict(**GPT)}, tmp_path / "gpt.pt")
    assert convert_main(["llamagen-vq", str(vq_file), str(tmp_path / "vq"), "--preset", "vq-test"]) == 0
    # 32 px at LlamaGen's downsample 16 is a 2 x 2 grid: refused against the tokenizer's 8 x 8 before anything is written
    assert convert_main(["llamagen-gpt", str(tmp_path / "gpt.pt"), str(tmp_path / "wrong"), "--preset", "gpt-test",
                         "--image-size", "32", "--tokenizer", str(tmp_path / "vq")]) == 2
    assert "grid [2, 2] differs from the tokenizer" in capsys.readouterr().err and not (tmp_path / "wrong").exists()
    generator = convert("llamagen-gpt", tmp_path / "gpt.pt", "gpt-test", image_size=128,
                        tokenizer=str(tmp_path / "vq"))
    assert generator.grid == (8, 8) and generator.provenance == {"tokenizer_fingerprint": fingerprint(tmp_path / "vq")}
    save_model(generator, tmp_path / "gpt")
    pipe = Pipeline(tmp_path / "vq", tmp_path / "gpt")  # folders are loaded; the pair is checked
    sampler = Sampler(temperature=1.0, top_k=8, cfg_scale=2.0)
    images = pipe.generate([0, 4], sampler=sampler, seed=3, output_type="pt")
    assert images.shape == (2, 3, 32, 32) and 0 <= images.min() and images.max() <= 1
    pipe.save_pretrained(tmp_path / "pipe")
    again = Pipeline.from_pretrained(tmp_path / "pipe")
    assert torch.equal(again.generate([0, 4], sampler=sampler, seed=3, output_type="pt"), images)
    # another tokenizer of the same sizes is refused by the recorded fingerprint
    other = vq_official.save_like_vq_train(vq_official.official_state_dict(seed=1, **VQ), tmp_path / "other.pt")
    save_model(convert("llamagen-vq", other, "vq-test"), tmp_path / "other")
    with pytest.raises(ValueError, match="fingerprint"):
        Pipeline(tmp_path / "other", tmp_path / "gpt")


def test_recording_a_tokenizer_of_another_vocabulary_is_refused(tmp_path, tiny_presets):
    vq_file = vq_official.save_like_vq_train(vq_official.official_state_dict(**VQ), tmp_path / "vq.pt")
    save_model(convert("llamagen-vq", vq_file, "vq-test"), tmp_path / "vq")
    state = gpt_official.official_state_dict(**{**GPT, "vocab_size": 24})
    generator = convert("llamagen-gpt", state, "gpt-test", vocab_size=24, image_size=128)
    with pytest.raises(ValueError, match="the generator has 24 codes, the tokenizer .* has 64"):
        record_tokenizer(generator, tmp_path / "vq")
    assert not getattr(generator, "provenance", None)

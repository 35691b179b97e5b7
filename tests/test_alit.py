"""ALIT: adaptive-length tokenizer by recurrent allocation over a frozen VQGAN2D (flexar/tokenizers/alit.py)."""
import inspect
from pathlib import Path

import pytest
import torch
import yaml

from flexar.tokenizers import ALIT, VQGAN2D
from flexar.tokenizers.alit import OFFICIAL_LOSS_WEIGHTS

from common import TokenizerContract
from test_karl import BASE_KWARGS, CountCalls, base_config, cell_noise, flat_images, saved_base, with_trained_base

ROOT = Path(__file__).resolve().parents[1]


def tiny_alit(**overrides):
    kwargs = dict(base_config=base_config(), tokens_per_iteration=2, max_iterations=4, width=32, depth=1, num_heads=2,
                  codebook_size=64, code_dim=8, dead_code_threshold=5)
    return with_trained_base(ALIT(**{**kwargs, **overrides}))


def sample_images():
    """4 flat images and 4 cell-noise images, all among the tiny base's training images."""
    return torch.cat([flat_images(4), cell_noise(4)])


class TestALITContract(TokenizerContract):
    def make_tokenizer(self):
        return tiny_alit()


class EncoderCalls:
    """Records the input and output of every encoder forward."""

    def __init__(self, module):
        self.inputs, self.outputs = [], []
        module.register_forward_hook(self.hook)

    def hook(self, module, args, output):
        self.inputs.append(args[0].detach().clone())
        self.outputs.append(output.detach().clone())


def oracle_decoder(tokenizer, images, noisy, confidence=12.0):
    """A stand-in for a trained decoder (one that a CPU test cannot train in seconds): logits ``confidence`` on the
    true base id of the cells it "knows", 0 elsewhere. It knows every cell of a flat image from the first latent on,
    and four more cells (in raster order) of a noise image per latent. What the tests check is ALIT's own machinery
    around it: dynamic halting on the encoder state, the per-image search and the lengths."""
    with torch.no_grad():
        _, truth = tokenizer.image_tokens(images)
    cells, vocabulary = truth.shape[1], tokenizer.base.codebook_size

    def decode_logits(codes, keep=None):
        known = torch.where(noisy, 4 * codes.shape[1], cells)
        covered = torch.arange(cells)[None, :] < known[:, None]
        logits = torch.zeros(truth.shape[0], cells, vocabulary)
        return logits.scatter(-1, truth[..., None], (confidence * covered.float())[..., None])

    return decode_logits


# -- the rollout -----------------------------------------------------------------------------------------------------
def test_token_count_is_step_times_iterations():
    tokenizer = tiny_alit().eval()
    assert tokenizer.max_tokens == 8 and tokenizer.grid is None
    images = sample_images()
    tokens, ids = tokenizer.image_tokens(images)
    steps = list(tokenizer.rollout(tokens, ids, tokenizer.max_iterations, sample=False))
    assert [step.quantized.ids.shape[1] for step in steps] == [2, 4, 6, 8]
    assert [step.logits.shape for step in steps] == [(8, 16, 16)] * 4
    encoded = tokenizer.encode(images)
    assert set(encoded.lengths.tolist()) <= {2, 4, 6, 8} and encoded.ids.shape[1] == int(encoded.lengths.max())
    past = torch.arange(encoded.ids.shape[1])[None, :] >= encoded.lengths[:, None]
    assert not encoded.ids[past].any()  # padded with 0 past the lengths


def test_earlier_latents_and_image_tokens_are_refined_never_re_embedded():
    torch.manual_seed(0)
    tokenizer = tiny_alit().eval()
    images = sample_images()
    recorded = EncoderCalls(tokenizer.encoder)
    tokens, ids = tokenizer.image_tokens(images)
    first, second = list(tokenizer.rollout(tokens, ids, 2, sample=False))
    # the first two latents change between iterations
    assert not torch.allclose(first.hidden, second.hidden[:, :2], atol=1e-4)
    assert not torch.equal(first.quantized.codes, second.quantized.codes[:, :2])
    # iteration 2 reads the previous encoder outputs (after halting), through encoder_ln_recursive, plus two new
    # latents that are the same learned vectors with iteration 2's embedding
    cells = tokenizer.num_cells
    with torch.no_grad():
        fill = tokenizer.encoder_mask_token + tokenizer.cell_pos
        previous_images = torch.where(first.masked[..., None], fill, recorded.outputs[0][:, :cells])
        previous = torch.cat([previous_images, first.hidden], dim=1)
        appended = (tokenizer.latent_tokens + tokenizer.latent_pos + tokenizer.iteration_embed[1]).expand(8, -1, -1)
        expected = tokenizer.encoder_ln_recursive(torch.cat([previous, appended], dim=1))
    assert torch.allclose(recorded.inputs[1], expected, atol=1e-5)
    assert recorded.inputs[1].shape == (8, cells + 4, 32)


def test_masked_fraction_of_image_tokens_rises_with_iterations(monkeypatch):
    tokenizer = tiny_alit(tokens_per_iteration=1).eval()
    images = sample_images()
    noisy = torch.arange(8) >= 4
    monkeypatch.setattr(tokenizer, "decode_logits", oracle_decoder(tokenizer, images, noisy))
    recorded = EncoderCalls(tokenizer.encoder)
    tokens, ids = tokenizer.image_tokens(images)
    steps = list(tokenizer.rollout(tokens, ids, 4, sample=False))
    fractions = [float(step.masked.float().mean()) for step in steps[:-1]]
    assert fractions == sorted(fractions) and fractions[-1] > fractions[0], fractions
    assert fractions == pytest.approx([(4 + 1) / 8, (4 + 2) / 8, (4 + 3) / 8])
    assert steps[-1].masked is None  # nothing is halted after the last iteration
    # the halted image tokens are replaced in the state by the mask token plus their position
    with torch.no_grad():
        fill = tokenizer.encoder_ln_recursive(tokenizer.encoder_mask_token + tokenizer.cell_pos)
    for step, next_input in zip(steps[:-1], recorded.inputs[1:]):
        masked = step.masked
        assert torch.allclose(next_input[:, : tokenizer.num_cells][masked], fill.expand(8, -1, -1)[masked], atol=1e-5)
        assert not torch.allclose(next_input[:, : tokenizer.num_cells][~masked], fill.expand(8, -1, -1)[~masked])


def test_halting_threshold_and_the_sampled_switch():
    tokenizer = tiny_alit().eval()
    ids = torch.zeros(2, 16, dtype=torch.long)
    probability = torch.linspace(0.0, 1.0, 32).reshape(2, 16)
    logits = torch.full((2, 16, 16), -30.0)
    logits[..., 0] = 0.0
    logits[..., 1] = torch.log(1 - probability) - torch.log(probability.clamp_min(1e-12))  # p(id 0) = probability
    p = logits.softmax(-1)[..., 0]
    threshold = tokenizer.halting_mask(logits, ids, sample=False)
    assert torch.equal(threshold, p >= 0.55)
    draws = [tokenizer.halting_mask(logits, ids, sample=True, generator=torch.Generator().manual_seed(seed))
             for seed in range(4)]
    assert all(bool((d <= threshold).all()) for d in draws)  # a draw only halts tokens over the threshold
    assert len({tuple(d.flatten().tolist()) for d in draws}) > 1
    again = tokenizer.halting_mask(logits, ids, sample=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, draws[0])
    with pytest.raises(ValueError, match="inference_halting must be one of"):
        tiny_alit(inference_halting="bernoulli")


def test_inference_is_deterministic_unless_sampling_is_asked_for(monkeypatch):
    images = sample_images()
    noisy = torch.arange(8) >= 4
    # p = 0.8 on the known cells: over the threshold, so the sampled mask differs from it
    for mode in ("threshold", "sampled"):
        tokenizer = tiny_alit(inference_halting=mode).eval()
        monkeypatch.setattr(tokenizer, "decode_logits", oracle_decoder(tokenizer, images, noisy, confidence=4.1))
        used = []
        halting_mask = tokenizer.halting_mask
        monkeypatch.setattr(tokenizer, "halting_mask", lambda *a, **k: used.append(a[2]) or halting_mask(*a, **k))
        first, second = tokenizer.encode(images), tokenizer.encode(images)
        assert torch.equal(first.ids, second.ids) and torch.equal(first.lengths, second.lengths)
        assert set(used) == {mode == "sampled"}
        # training draws the mask whatever the inference mode
        used.clear()
        tokenizer.train().training_loss(images)
        assert set(used) == {True}


# -- the search and forced lengths -----------------------------------------------------------------------------------
def test_search_takes_the_first_iteration_under_the_threshold_else_the_best(monkeypatch):
    tokenizer = tiny_alit().eval()
    images = sample_images()[:4]
    errors = torch.tensor([
        [0.20, 0.05, 0.01, 0.01],  # under 0.07 at iteration 2
        [0.30, 0.20, 0.25, 0.40],  # never: the best is iteration 2
        [0.01, 0.30, 0.30, 0.30],  # iteration 1
        [0.50, 0.40, 0.30, 0.08],  # never: the best is iteration 4
    ])
    calls = []

    def scripted_error(images, reconstructions):
        calls.append(len(calls))
        return errors[:, calls[-1]]

    monkeypatch.setattr(tokenizer, "reconstruction_error", scripted_error)
    tokens, ids = tokenizer.image_tokens(images)
    reference = [step.quantized.ids for step in tokenizer.rollout(tokens, ids, 4, sample=False)]
    encoded = tokenizer.encode(images)
    assert encoded.lengths.tolist() == [4, 4, 2, 8]
    for row, iteration in enumerate([1, 1, 0, 3]):
        length = 2 * (iteration + 1)
        assert torch.equal(encoded.ids[row, :length], reference[iteration][row])  # the chosen iteration's ids
    # the rollout stops as soon as every image has its iteration
    calls.clear()
    encoder_calls = CountCalls(tokenizer.encoder)
    errors[:, 1] = 0.0
    assert tokenizer.encode(images).lengths.tolist() == [4, 4, 2, 4]
    assert encoder_calls.count == 2 and len(calls) == 2
    assert tokenizer.error_threshold == 0.07


def test_flat_images_stop_earlier_than_noise(monkeypatch):
    tokenizer = tiny_alit(tokens_per_iteration=1).eval()
    images = sample_images()
    noisy = torch.arange(8) >= 4
    with torch.no_grad():
        base_error = tokenizer.reconstruction_error(images, tokenizer.base.reconstruct(images))
    threshold = float(base_error.max()) + 0.01  # reachable by every image once its base codes are all known
    monkeypatch.setattr(tokenizer, "decode_logits", oracle_decoder(tokenizer, images, noisy))
    lengths = tokenizer.encode(images, error_threshold=threshold).lengths
    assert lengths[:4].tolist() == [1, 1, 1, 1]
    assert int(lengths[4:].min()) > 1, lengths
    # the same choice with a threshold no image reaches: each takes its best iteration, all known cells for noise
    lengths = tokenizer.encode(images, error_threshold=0.0).lengths
    assert int(lengths[:4].max()) <= int(lengths[4:].min()) and lengths[4:].tolist() == [4, 4, 4, 4]


def test_forced_length_is_honoured():
    tokenizer = tiny_alit().eval()
    images = sample_images()
    tokens, ids = tokenizer.image_tokens(images)
    reference = [step.quantized.ids for step in tokenizer.rollout(tokens, ids, 4, sample=False)]
    calls = CountCalls(tokenizer.encoder)
    for count, iterations in ((2, 1), (4, 2), (5, 3), (8, 4)):
        calls.count = 0
        encoded = tokenizer.encode(images, num_tokens=count)
        assert encoded.lengths.tolist() == [count] * 8 and encoded.ids.shape == (8, count)
        assert calls.count == iterations  # whole iterations, then the first `count` latents of the last one
        assert torch.equal(encoded.ids, reference[iterations - 1][:, :count])
        assert tokenizer.decode(encoded.ids, encoded.lengths).shape == images.shape


# -- objective -------------------------------------------------------------------------------------------------------
def test_per_iteration_weights_apply_to_the_cross_entropy_only(monkeypatch):
    assert tiny_alit().loss_weights == [2.5, 2.0, 1.5, 1.25]
    assert tiny_alit(max_iterations=10).loss_weights == list(OFFICIAL_LOSS_WEIGHTS) + [1.0, 1.0]
    with pytest.raises(ValueError, match="loss_weights must hold max_iterations = 4"):
        tiny_alit(loss_weights=[1.0, 1.0])
    tokenizer = tiny_alit(loss_weights=[3.0, 0.0, 1.0, 2.0]).train()
    quantizer_losses, terms = [], iter([(torch.tensor(float(t + 1)), torch.tensor(0.5)) for t in range(4)])
    latent_codes = tokenizer.latent_codes

    def recording(hidden):
        out = latent_codes(hidden)
        quantizer_losses.append(out.loss)
        return out

    monkeypatch.setattr(tokenizer, "latent_codes", recording)
    monkeypatch.setattr(tokenizer, "distillation_terms", lambda logits, ids: next(terms))
    loss, logs = tokenizer.training_loss(sample_images())
    expected = 3.0 * 1 + 0.0 * 2 + 1.0 * 3 + 2.0 * 4 + 4 * 0.5 + sum(quantizer_losses)
    assert torch.allclose(loss, expected)
    assert {"cross_entropy_2", "cross_entropy_8", "masked_2", "masked_6", "psnr"} <= set(logs)


# -- saving, configs and the CLI -------------------------------------------------------------------------------------
def test_a_saved_alit_loads_without_its_base_folder(tmp_path, monkeypatch):
    base_folder = saved_base(tmp_path / "base")
    torch.manual_seed(0)
    tokenizer = ALIT.from_preset("alit-tiny", base=base_folder).eval()
    images = sample_images()
    encoded = tokenizer.encode(images)
    tokenizer.save_pretrained(tmp_path / "alit")
    for entry in (tmp_path / "base").iterdir():
        entry.unlink()
    monkeypatch.chdir(tmp_path)
    loaded = ALIT.from_pretrained(tmp_path / "alit")
    assert loaded.config["base"] is None and loaded.config["base_config"]["kwargs"] == VQGAN2D(**BASE_KWARGS).config
    assert torch.equal(loaded.encode(images).ids, encoded.ids)
    assert {"alit-s", "alit-b", "alit-l", "alit-tiny", "alit-cpu"} <= set(ALIT.presets)


def test_configs_name_constructor_arguments():
    accepted = set(inspect.signature(ALIT.__init__).parameters)
    from test_configs import composed

    for files, dataset in ((["tokenizers/alit.yaml"], "photos"),
                           (["tokenizers/alit.yaml", "data/mnist.yaml", "tokenizers/mnist/alit.yaml"], "mnist")):
        config = composed(*files)
        tokenizer = config["model"]["init_args"]["tokenizer"]
        assert tokenizer["class_path"] == "flexar.tokenizers.ALIT" and set(tokenizer["init_args"]) <= accepted
        assert ALIT.presets["alit-cpu"].items() <= tokenizer["init_args"].items()  # the configs are the CPU preset
        assert config["data"]["init_args"]["dataset"] == dataset


def test_training_through_the_cli(tmp_path):
    from flexar.train.cli import run

    config = yaml.safe_load((ROOT / "configs" / "tokenizers" / "alit.yaml").read_text())
    config["trainer"].update(max_epochs=1, limit_train_batches=2, limit_val_batches=1, enable_progress_bar=False,
                             log_every_n_steps=1)
    config["trainer"]["callbacks"][0]["init_args"].update(num_images=4, every_n_epochs=1)
    torch.manual_seed(0)
    VQGAN2D(**{**BASE_KWARGS, "channels": 3}).save_pretrained(tmp_path / "base")  # an untrained RGB base
    tokenizer = config["model"]["init_args"]["tokenizer"]["init_args"]
    tokenizer.update(base=str(tmp_path / "base"), width=32, depth=1, num_heads=2, tokens_per_iteration=2,
                     max_iterations=3, codebook_size=32)
    config["model"]["init_args"]["export_dir"] = str(tmp_path / "tokenizer")
    config["data"]["init_args"].update(image_size=16, batch_size=8)
    (tmp_path / "alit.yaml").write_text(yaml.safe_dump(config))
    run(["fit", "--config", str(tmp_path / "alit.yaml"), "--trainer.default_root_dir", str(tmp_path / "run")])
    exported = ALIT.from_pretrained(tmp_path / "tokenizer")
    assert exported.max_tokens == 6 and exported.channels == 3 and exported.config["base"] is None
    assert list((tmp_path / "run").rglob("reconstructions_epoch000.png"))

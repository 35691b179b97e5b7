"""Shared interface checks: every tokenizer family subclasses TokenizerContract, every generator family
GeneratorContract, each with a tiny instance."""
import copy
import json

import numpy as np
import pytest
import torch

from flexar.generators import GenerationOutput, Generator
from flexar.hub import load_model
from flexar.sampling import Sampler



def save_tiny_pipeline(folder):
    """A tiny untrained TiTok + RasterAR pipeline for 16 px digits saved at `folder` (the generator records the
    tokenizer's fingerprint, as one trained on its token cache does); returns the folder."""
    from flexar import Pipeline
    from flexar.generators import RasterAR
    from flexar.hub import model_fingerprint
    from flexar.tokenizers import TiTok

    torch.manual_seed(0)
    tokenizer = TiTok(image_size=16, channels=1, patch_size=4, num_latent_tokens=4, width=32, depth=1, num_heads=2,
                      codebook_size=32, code_dim=8).eval()
    generator = RasterAR(vocab_size=32, max_tokens=4, num_classes=10, dim=32, depth=1, num_heads=2).eval()
    generator.provenance = {"tokenizer_fingerprint": model_fingerprint(tokenizer)}
    Pipeline(tokenizer, generator).save_pretrained(folder)
    return folder


def digits_batch(count=8, image_size=16, channels=1):
    from flexar.data import build_dataset

    dataset = build_dataset("digits", "train", image_size=image_size, channels=channels)
    images = torch.stack([dataset[i][0] for i in range(count)])
    labels = torch.tensor([int(dataset[i][1]) for i in range(count)])
    return images, labels


class TokenizerContract:
    """Subclasses set `make_tokenizer()` returning a tiny tokenizer for 16x16 single-channel images."""

    image_size = 16
    channels = 1

    def make_tokenizer(self):
        raise NotImplementedError

    @pytest.fixture
    def tokenizer(self):
        torch.manual_seed(0)
        return self.make_tokenizer().eval()

    @pytest.fixture
    def images(self):
        return digits_batch(6, self.image_size, self.channels)[0]

    def test_encode_decode_shapes(self, tokenizer, images):
        encoded = tokenizer.encode(images)
        assert encoded.ids.dtype == torch.long and encoded.ids.shape[0] == images.shape[0]
        assert encoded.ids.shape[1] <= tokenizer.max_tokens
        assert encoded.lengths.shape == (images.shape[0],)
        assert int(encoded.ids.min()) >= 0 and int(encoded.ids.max()) < tokenizer.codebook_size
        decoded = tokenizer.decode(encoded.ids, encoded.lengths)
        assert decoded.shape == images.shape

    def test_code_vectors(self, tokenizer):
        vectors = tokenizer.code_vectors()
        assert vectors.dim() == 2 and vectors.shape[0] == tokenizer.codebook_size

    def test_bad_images_are_refused(self, tokenizer, images):
        with pytest.raises(ValueError, match="expects images of shape"):
            tokenizer.encode(images.repeat(1, 3, 1, 1))
        with pytest.raises(ValueError, match="expects images of shape"):
            tokenizer.encode(images[..., :-2, :-2])

    def test_bad_image_values_are_refused(self, tokenizer, images):
        for value in (float("nan"), float("inf"), -float("inf")):
            bad = images.clone()
            bad[0, 0, 0, 0] = value
            with pytest.raises(ValueError, match="NaN or Inf"):
                tokenizer.encode(bad)
        with pytest.raises(ValueError, match=r"float64.*images\.to\(torch\.float32\)"):
            tokenizer.encode(images.double())
        # never cast silently, but a float64 tokenizer takes float64 images
        assert copy.deepcopy(tokenizer).double().encode(images.double()).ids.shape[0] == images.shape[0]
        # floats in [0, 255] or [0, 1] are not silently encoded (they used to give all-zero ids)
        for scaled in ((images + 1) * 127.5, images * 3):
            with pytest.raises(ValueError, match=r"must lie in \[-1, 1\].*\[0, 1\].*\[0, 255\]"):
                tokenizer.encode(scaled)
        # a resize's small overshoot is tolerated
        edge = images.clone()
        edge[0, 0, 0, 0], edge[0, 0, 0, 1] = 1 + 5e-4, -1 - 5e-4
        assert tokenizer.encode(edge).ids.shape[0] == images.shape[0]

    def test_num_tokens_out_of_range(self, tokenizer, images):
        for bad in (0, tokenizer.max_tokens + 1, -3, True, 1.0, "2", torch.tensor([1])):
            with pytest.raises(ValueError, match="num_tokens must be an int in"):
                tokenizer.encode(images, num_tokens=bad)

    def test_numpy_integers_are_ints(self, tokenizer, images):
        reference = tokenizer.encode(images, num_tokens=tokenizer.max_tokens).ids
        for count in (np.int64(tokenizer.max_tokens), np.int32(tokenizer.max_tokens), torch.tensor(tokenizer.max_tokens)):
            encoded = tokenizer.encode(images, num_tokens=count)
            assert torch.equal(encoded.ids, reference) and encoded.lengths.dtype == torch.long

    def test_bad_ids_are_refused(self, tokenizer):
        with pytest.raises(ValueError, match="token ids must lie in"):
            tokenizer.decode(torch.full((1, 2), tokenizer.codebook_size, dtype=torch.long))
        with pytest.raises(ValueError, match="long tensor"):
            tokenizer.decode(torch.zeros(1, 2))
        with pytest.raises(ValueError, match="ids hold no tokens"):
            tokenizer.decode(torch.zeros(2, 0, dtype=torch.long))

    def test_bad_lengths_are_refused(self, tokenizer, images):
        encoded = tokenizer.encode(images[:3])
        length = encoded.ids.shape[1]
        expected = rf"lengths must be a \(3,\) integer tensor with 1 <= lengths <= {length}"
        for bad in (
            torch.full((1,), length),  # used to broadcast over the batch
            torch.full((3, 1), length),
            torch.zeros(3, dtype=torch.long),  # used to decode an all-padding image
            torch.full((3,), length + 1),
            torch.full((3,), length - 0.1),  # used to truncate to length - 1
            torch.ones(3, dtype=torch.bool),
        ):
            with pytest.raises(ValueError, match=expected):
                tokenizer.decode(encoded.ids, bad)
        reference = tokenizer.decode(encoded.ids, encoded.lengths)
        assert torch.equal(tokenizer.decode(encoded.ids, encoded.lengths.int()), reference)
        assert torch.equal(tokenizer.decode(encoded.ids, encoded.lengths.numpy()), reference)

    def test_decode_stays_in_the_image_range(self, tokenizer):
        # larger weights make the raw decoder output overshoot [-1, 1]; decode must still return the image range
        with torch.no_grad():
            for parameter in tokenizer.parameters():
                parameter.mul_(3.0)
        ids = torch.randint(0, tokenizer.codebook_size, (4, tokenizer.max_tokens), generator=seeded(2))
        decoded = tokenizer.decode(ids)
        assert torch.isfinite(decoded).all()
        assert decoded.min() >= -1.0 and decoded.max() <= 1.0, (decoded.min(), decoded.max())
        assert (decoded.abs() == 1.0).any()  # the overshoot happened: the range is held by decode, not by chance

    def test_save_load_round_trip(self, tokenizer, images, tmp_path):
        tokenizer.save_pretrained(tmp_path / "tok")
        loaded = type(tokenizer).from_pretrained(tmp_path / "tok").eval()
        encoded = tokenizer.encode(images)
        assert torch.equal(loaded.encode(images).ids, encoded.ids)
        assert torch.equal(loaded.decode(encoded.ids, encoded.lengths), tokenizer.decode(encoded.ids, encoded.lengths))

    def test_training_reduces_reconstruction_error(self, images):
        torch.manual_seed(0)
        tokenizer = self.make_tokenizer()
        optimizer = torch.optim.AdamW(tokenizer.parameters(), lr=2e-3)
        with torch.no_grad():
            before = torch.mean((tokenizer.eval().reconstruct(images) - images) ** 2)
        tokenizer.train()
        for _ in range(60):
            loss, logs = tokenizer.training_loss(images)
            assert torch.isfinite(loss)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            after = torch.mean((tokenizer.eval().reconstruct(images) - images) ** 2)
        assert after < 0.7 * before, (before, after)


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def perturbed(model, noise: float, seed=1):
    """A draft close to `model`: a copy of the same class and config with Gaussian noise of scale `noise` on every
    weight (acceptance high but below 1)."""
    draft = type(model)(**model.config).eval()
    draft.load_state_dict(model.state_dict())
    generator = seeded(seed)
    with torch.no_grad():
        for parameter in draft.parameters():
            parameter.add_(noise * torch.randn(parameter.shape, generator=generator))
    return draft


def random_ids(model, batch=3, length=None, seed=1):
    length = model.max_tokens if length is None else length
    return torch.randint(0, model.vocab_size, (batch, length), generator=seeded(seed))


class GeneratorContract:
    """Interface checks shared by generator families: subclasses set `make_generator()` returning a tiny
    class-conditional generator on CPU."""

    def make_generator(self) -> Generator:
        raise NotImplementedError

    @pytest.fixture
    def model(self):
        torch.manual_seed(0)
        return self.make_generator().eval()

    def labels(self, model, batch=3):
        return torch.arange(batch) % model.num_classes

    def test_output_and_stats(self, model):
        out = model.generate(self.labels(model), Sampler(top_k=5), seeded())
        assert isinstance(out, GenerationOutput)
        assert out.ids.shape == (3, model.max_tokens) and out.ids.dtype == torch.long
        assert 0 <= int(out.ids.min()) and int(out.ids.max()) < model.vocab_size
        assert out.stats["tokens"] == 3 * model.max_tokens
        assert out.stats["forward_passes"] >= 1 and out.stats["seconds"] > 0

    def test_seeded_generation_is_reproducible(self, model):
        sampler = Sampler(temperature=1.0, cfg_scale=2.0)
        first = model.generate(self.labels(model), sampler, seeded(5)).ids
        second = model.generate(self.labels(model), sampler, seeded(5)).ids
        assert torch.equal(first, second)
        assert not torch.equal(first, model.generate(self.labels(model), sampler, seeded(6)).ids)

    def test_unseeded_generation_leaves_the_global_rng_alone(self, model):
        state = torch.get_rng_state()
        model.generate(self.labels(model), Sampler())
        assert torch.equal(torch.get_rng_state(), state)

    def test_bad_arguments_are_refused(self, model):
        sampler = Sampler()
        with pytest.raises(ValueError, match=rf"labels must lie in \[0, {model.num_classes}\)"):
            model.generate(torch.tensor([0, model.num_classes]), sampler, seeded())
        with pytest.raises(ValueError, match=r"labels must be a \(B,\) long tensor"):
            model.generate(torch.zeros(2, 1, dtype=torch.long), sampler, seeded())
        with pytest.raises(ValueError, match=r"num_tokens must be an int in \[1, "):
            model.generate(self.labels(model), sampler, seeded(), num_tokens=model.max_tokens + 1)
        labels = self.labels(model, 2)
        expected = rf"ids must be a \(B, L\) long tensor with 1 <= L <= {model.max_tokens}"
        for bad in (
            torch.zeros(model.max_tokens, dtype=torch.long),
            torch.zeros(2, model.max_tokens),
            torch.zeros(2, model.max_tokens + 1, dtype=torch.long),
        ):
            with pytest.raises(ValueError, match=expected):
                model.training_loss(bad, labels)
        with pytest.raises(ValueError, match=rf"token ids must lie in \[0, {model.vocab_size}\)"):
            model.training_loss(torch.full((2, model.max_tokens), model.vocab_size), labels)
        with pytest.raises(ValueError, match=rf"labels must lie in \[0, {model.num_classes}\)"):
            model.training_loss(random_ids(model, 2), torch.tensor([-1, 0]))

    def test_save_load_round_trip(self, model, tmp_path):
        model.save_pretrained(tmp_path / "gen")
        config = json.loads((tmp_path / "gen" / "config.json").read_text())
        assert config["class"] == type(model).__name__
        loaded = type(model).from_pretrained(tmp_path / "gen").eval()
        assert isinstance(load_model(tmp_path / "gen", kind=Generator), type(model))
        ids, labels = random_ids(model), self.labels(model)
        with torch.no_grad():
            assert torch.equal(loaded.training_loss(ids, labels)[0], model.training_loss(ids, labels)[0])
        sampler = Sampler(cfg_scale=3.0)
        assert torch.equal(loaded.generate(labels, sampler, seeded()).ids, model.generate(labels, sampler, seeded()).ids)

    def test_training_lowers_the_loss(self):
        torch.manual_seed(0)
        model = self.make_generator().train()
        labels = torch.arange(8) % model.num_classes
        # each class has its own fixed sequence: learnable by a tiny model in a few dozen steps
        steps = torch.arange(model.max_tokens)
        ids = (labels[:, None] * 5 + steps[None, :] * (labels[:, None] + 1)) % model.vocab_size
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses = []
        for _ in range(40):
            loss, logs = model.training_loss(ids, labels)
            assert torch.isfinite(loss) and set(logs) >= {"loss", "accuracy", "perplexity"}
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert losses[-1] < 0.4 * losses[0], losses


class FailingImages(torch.utils.data.Dataset):
    """The items of `images` until item `fail_at`, which raises (a run dying in the middle of writing a cache)."""

    def __init__(self, images, fail_at):
        self.images, self.fail_at = images, fail_at

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        if index == self.fail_at:
            raise KeyboardInterrupt("interrupted while encoding")
        return self.images[index]

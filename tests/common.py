"""Shared interface checks: every tokenizer family subclasses TokenizerContract with a tiny instance."""
import pytest
import torch

from flexar.hub import load_weights


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

    def test_num_tokens_out_of_range(self, tokenizer, images):
        for bad in (0, tokenizer.max_tokens + 1, -3):
            with pytest.raises(ValueError, match="num_tokens must be an int in"):
                tokenizer.encode(images, num_tokens=bad)

    def test_bad_ids_are_refused(self, tokenizer):
        with pytest.raises(ValueError, match="token ids must lie in"):
            tokenizer.decode(torch.full((1, 2), tokenizer.codebook_size, dtype=torch.long))
        with pytest.raises(ValueError, match="long tensor"):
            tokenizer.decode(torch.zeros(1, 2))

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

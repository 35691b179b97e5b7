"""A small CNN classifier whose penultimate layer gives FID features for small image sets.

Inception-v3 (Szegedy et al., 2016, "Rethinking the Inception Architecture for Computer Vision"), the feature
network of FID (Heusel et al., 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
Equilibrium"), was trained on ImageNet photographs: on 32x32 grayscale digits, upsampled to 299x299, its features
say little about digit shape. The usual practice for such sets is to score with the features of a classifier
trained on the dataset itself. This file provides that classifier, a thin LightningModule to train it, and the
torch-fidelity feature extractor (Obukhov et al., 2020, "High-fidelity performance metrics for generative models in
PyTorch") that loads a saved classifier, registered under ``CLASSIFIER_EXTRACTOR``.

A saved classifier is a folder like every flexar model's (:mod:`flexar.hub`): ``config.json`` (``"class"`` and the
constructor's ``"kwargs"``) and ``model.safetensors``, so ``flexar.hub.load_model`` reads it; loading never unpickles
anything.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import lightning
import torch
import torch.nn.functional as F
from torch import nn
from torch_fidelity import register_feature_extractor
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from flexar.hub import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    Configurable,
    PretrainedMixin,
    build_from_config,
    fingerprint,
    load_model,
    load_weights,
    read_config,
    register,
)
from flexar.train.modules import check_finite_loss, refuse_existing_export

CLASSIFIER_EXTRACTOR = "flexar-classifier"

# ITU-R BT.601 luma weights, the ones PIL uses for mode "L": they sum to one, so a grey image repeated to three
# channels maps back to itself.
_LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def _conv_block(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    # GroupNorm rather than BatchNorm: without running statistics the network computes the same function in
    # training and in evaluation, so exported features never hinge on how well running averages tracked training.
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1),
        nn.GroupNorm(math.gcd(8, out_channels), out_channels),
        nn.SiLU(),
    )


@register
class DigitClassifier(Configurable, PretrainedMixin, nn.Module):
    """Six 3x3 conv blocks (three stride-2), flattened, a hidden layer (the features) and a linear head.

    The final (image_size / 8)^2 map is flattened rather than average-pooled: a digit's identity lies in where its
    strokes are, and keeping the layout trains several times faster on digits than global pooling does.

    Saved like every flexar model (``save_pretrained`` / ``from_pretrained``, or :func:`flexar.hub.load_model` on
    the folder): ``config.json`` holds ``{"class": "DigitClassifier", "kwargs": {...}}``.

    Shapes: ``images`` (B, in_channels, image_size, image_size) float in [-1, 1];
    ``features`` (B, feature_dim); ``logits`` (B, num_classes).
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        image_size: int = 32,
        width: int = 32,
        feature_dim: int = 128,
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("num_classes", num_classes), ("image_size", image_size),
                            ("width", width), ("feature_dim", feature_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DigitClassifier: {name} must be a positive int, got {value!r}")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.image_size = image_size
        self.width = width
        self.feature_dim = feature_dim
        self.body = nn.Sequential(
            _conv_block(in_channels, width, stride=1),
            _conv_block(width, 2 * width, stride=2),
            _conv_block(2 * width, 2 * width, stride=1),
            _conv_block(2 * width, 4 * width, stride=2),
            _conv_block(4 * width, 4 * width, stride=1),
            _conv_block(4 * width, 4 * width, stride=2),
            nn.Flatten(),
        )
        # each stride-2 block maps a side s to ceil(s / 2)
        side = image_size
        for _ in range(3):
            side = (side + 1) // 2
        self.hidden = nn.Linear(4 * width * side * side, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, image_size, image_size) in [-1, 1] -> penultimate activations (B, feature_dim)."""
        expected = (self.in_channels, self.image_size, self.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            shape = ", ".join(map(str, expected))
            raise ValueError(f"expected images of shape (B, {shape}), got {tuple(images.shape)}")
        return F.silu(self.hidden(self.body(images)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, image_size, image_size) in [-1, 1] -> logits (B, num_classes)."""
        return self.head(self.features(images))

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> "DigitClassifier":
        """Load a folder written by ``save_pretrained`` (in eval mode, as :func:`flexar.hub.load_model` returns it).

        Raises FileNotFoundError for a missing folder and ValueError for a folder that holds no classifier, names
        another class, or holds weights that are not safetensors or do not fit. A folder from flexar versions that
        wrote the constructor's arguments beside ``"class"`` (no ``"kwargs"``) still loads, with a FutureWarning.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"classifier folder {str(folder)!r} does not exist")
        config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
        if not config_path.is_file() or not weights_path.is_file():
            raise ValueError(
                f"{str(folder)!r} is not a flexar classifier folder: it needs {CONFIG_NAME} and {WEIGHTS_NAME}"
            )
        config = read_config(folder)
        if "kwargs" in config or config.get("class") != cls.__name__:
            return load_model(folder, kind=cls)
        return cls._from_flat_config(folder, config)

    @classmethod
    def _from_flat_config(cls, folder: Path, config: dict) -> "DigitClassifier":
        """Read the earlier layout, ``{"class": "DigitClassifier", "in_channels": ..., ...}``: the same checks as
        :func:`flexar.hub.load_model` (argument names and types, safetensors only, strict weights)."""
        config_path = folder / CONFIG_NAME
        warnings.warn(
            f"{config_path} is in the layout of earlier flexar versions (arguments beside 'class', no 'kwargs'): "
            "flexar.hub.load_model cannot read it; re-save it with DigitClassifier.from_pretrained(folder)"
            ".save_pretrained(new_folder)", FutureWarning, stacklevel=3,
        )
        kwargs = {key: value for key, value in config.items() if key != "class"}
        model = build_from_config({"class": cls.__name__, "kwargs": kwargs}, kind=cls, source=config_path)
        state = load_weights(folder / WEIGHTS_NAME)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise ValueError(f"weights in {folder} do not match the network in {CONFIG_NAME}: {error}") from None
        model.provenance = {}
        model.fingerprint = fingerprint(folder)
        return model.eval()


class ClassifierModule(lightning.LightningModule):
    """Trains a ``DigitClassifier`` with cross-entropy and exports it with ``save_pretrained`` when fitting ends.

    Batches are ``(images, labels)``: images float (B, in_channels, image_size, image_size) in [-1, 1], labels long
    (B,). Logs ``train/loss``, ``val/loss`` and ``val/accuracy``.

    Args:
        in_channels, num_classes, image_size, width, feature_dim: the ``DigitClassifier``'s arguments.
        lr, weight_decay: AdamW settings.
        export_dir: where ``save_pretrained`` writes the classifier when fitting ends; None means
            ``<trainer.log_dir>/classifier``.
        overwrite_export: replace an export folder that already holds files; without it such a folder is refused
            when fitting starts.

    A non-finite training loss stops the run with an error naming the step, and nothing is exported.
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        image_size: int = 32,
        width: int = 32,
        feature_dim: int = 128,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        export_dir: str | None = None,
        overwrite_export: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.classifier = DigitClassifier(
            in_channels=in_channels,
            num_classes=num_classes,
            image_size=image_size,
            width=width,
            feature_dim=feature_dim,
        )
        self.lr = lr
        self.weight_decay = weight_decay
        self.export_dir = export_dir
        self.overwrite_export = overwrite_export
        self._export_folder: str | None = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(images)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_index: int) -> torch.Tensor:
        images, labels = batch
        loss = F.cross_entropy(self.classifier(images), labels)
        check_finite_loss(self, loss, batch_index)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_index: int) -> None:
        images, labels = batch
        logits = self.classifier(images)
        self.log("val/loss", F.cross_entropy(logits, labels), sync_dist=True)
        accuracy = (logits.argmax(dim=-1) == labels).float().mean()
        self.log("val/accuracy", accuracy, prog_bar=True, sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.classifier.parameters(), lr=self.lr, weight_decay=self.weight_decay)

    def export_folder(self) -> str:
        # trainer.log_dir broadcasts from rank zero, so every rank must ask for it
        return self.export_dir if self.export_dir is not None else os.path.join(self.trainer.log_dir, "classifier")

    def on_fit_start(self) -> None:
        self._export_folder = self.export_folder()
        refuse_existing_export(self, Path(self._export_folder), self.overwrite_export)

    def on_fit_end(self) -> None:
        from flexar.train.export import describe_network, gathered_state_dict, network_weights, rebuild

        folder = self._export_folder if self._export_folder is not None else self.export_folder()
        # every rank takes the state dict (a collective under FSDP, whose ranks hold shards); rank zero writes
        state = gathered_state_dict(self)
        if self.trainer.is_global_zero:
            weights = network_weights(state, "classifier.", "the trained classifier")
            rebuild(describe_network(self.classifier), weights, "the trained classifier").save_pretrained(folder)


class ClassifierFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity feature extractor backed by a saved ``DigitClassifier``.

    torch-fidelity builds it as ``cls(name, features_list, **calculate_metrics_kwargs)``; the classifier folder comes
    in ``feature_extractor_weights_path``. Input: uint8 (B, 3, H, W) as torch-fidelity provides it, converted to
    [-1, 1], resized to the classifier's ``image_size`` and reduced to luma when the classifier is grayscale.
    Features: ``"classifier"`` (B, feature_dim) for FID/KID/PRC and ``"logits"`` (B, num_classes) for the Inception
    Score.
    """

    def __init__(
        self,
        name: str,
        features_list: list[str],
        feature_extractor_weights_path: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise ValueError(
                f"feature extractor {name!r} needs feature_extractor_weights_path, a folder saved by "
                "DigitClassifier.save_pretrained"
            )
        self.classifier = DigitClassifier.from_pretrained(feature_extractor_weights_path)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return "classifier", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return {"isc": "logits", "fid": "classifier", "kid": "classifier", "prc": "classifier"}[metric]

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected uint8 images (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        classifier = self.classifier
        pixels = images.float() / 127.5 - 1.0
        size = classifier.image_size
        if pixels.shape[-2:] != (size, size):
            pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        if classifier.in_channels == 1 and pixels.shape[1] == 3:
            weights = pixels.new_tensor(_LUMA_WEIGHTS).view(1, 3, 1, 1)
            pixels = (pixels * weights).sum(dim=1, keepdim=True)
        elif classifier.in_channels == 3 and pixels.shape[1] == 1:
            pixels = pixels.expand(-1, 3, -1, -1)
        elif classifier.in_channels != pixels.shape[1]:
            raise ValueError(f"classifier expects {classifier.in_channels} channels, got {pixels.shape[1]}")
        features = classifier.features(pixels)
        outputs = {"classifier": features}
        if "logits" in self.features_list:
            outputs["logits"] = classifier.head(features)
        return tuple(outputs[name] for name in self.features_list)


def register_classifier_extractor() -> str:
    """Make ``CLASSIFIER_EXTRACTOR`` known to torch-fidelity (idempotent); returns the name."""
    if CLASSIFIER_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(CLASSIFIER_EXTRACTOR, ClassifierFeatureExtractor)
    return CLASSIFIER_EXTRACTOR


register_classifier_extractor()

"""flexar.convert's safe reading and key accounting, and the flexar-convert command (format-independent parts)."""
import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from flexar.cli.convert import main as convert_main
from flexar.convert import FORMATS, Weights, convert, read_state_dict


class Payload:
    """Unpickling this calls print: what a malicious checkpoint would do with os.system."""

    def __reduce__(self):
        return print, ("this ran while unpickling",)


def test_a_pickle_that_runs_code_is_refused_and_never_executed(tmp_path, capsys):
    path = tmp_path / "model.pt"
    with open(path, "wb") as file:
        pickle.dump({"weight": Payload()}, file, protocol=2)
    with pytest.raises(ValueError, match=r"does not load with torch.load\(weights_only=True\)"):
        read_state_dict(path)
    assert "this ran" not in capsys.readouterr().out


def test_state_dicts_are_read_from_safetensors_and_from_nested_pickles(tmp_path):
    tensors = {"a.weight": torch.randn(3, 2), "b.bias": torch.zeros(4)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    read = read_state_dict(tmp_path / "model.safetensors")
    assert set(read) == set(tensors) and all(torch.equal(read[key], tensors[key]) for key in tensors)
    torch.save({"model": tensors, "optimizer": None, "steps": 10}, tmp_path / "ckpt.pt")
    assert set(read_state_dict(tmp_path / "ckpt.pt", ("ema", "model"))) == set(tensors)
    torch.save({"optimizer": {}, "steps": 10}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"no state dict under 'ema' or 'model'; .*\['optimizer', 'steps'\]"):
        read_state_dict(tmp_path / "other.pt", ("ema", "model"))
    (tmp_path / "model.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="unknown checkpoint suffix '.npz'"):
        read_state_dict(tmp_path / "model.npz")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_state_dict(tmp_path / "absent.pt")


def test_weights_name_missing_unexpected_mis_shaped_and_twice_read_keys():
    weights = Weights({"a": torch.zeros(2, 3), "b": torch.zeros(1), "c.running": torch.zeros(1)}, "ckpt.pt")
    with pytest.raises(KeyError, match="ckpt.pt has no key 'z' \\(missing key\\)"):
        weights.take("z")
    with pytest.raises(ValueError, match=r"'a' of ckpt.pt has shape \(2, 3\), the model expects \(3, 2\)"):
        weights.take("a", (3, 2))
    target = torch.ones(2, 3, dtype=torch.float64)
    weights.copy("a", target)
    assert target.dtype == torch.float64 and not target.any()
    with pytest.raises(ValueError, match="read twice"):
        weights.take("a")
    assert weights.ignore(r"c\..*", "recomputed") == ["c.running"]
    with pytest.raises(ValueError, match=r"1 unexpected key\(s\) the converter does not know: 'b'"):
        weights.finish()
    weights.take("b")
    weights.finish()


class DoubleFormat:
    """A format of one official size: a Linear(2, 2) saved as {"model": {"w": ..., "b": ..., "step": ...}} with
    ``step`` a training counter the converter ignores."""

    PRESETS = {"double": {}}
    CHECKPOINT_KEYS = ("model",)
    BINDS_TOKENIZER = True  # build takes the tokenizer folder itself

    built_with: dict = {}

    @staticmethod
    def build(preset, **overrides):
        DoubleFormat.built_with = overrides
        return torch.nn.Linear(2, 2)

    @staticmethod
    def load(model, weights):
        weights.copy("w", model.weight)
        weights.copy("b", model.bias)
        weights.ignore("step", "a training counter")


@pytest.fixture
def double_format(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "flexar_test_double_format", DoubleFormat)
    monkeypatch.setitem(FORMATS, "double", "flexar_test_double_format")
    return "double"


def test_convert_consumes_every_key_and_the_command_writes_a_loadable_folder(tmp_path, capsys, monkeypatch,
                                                                             double_format):
    from flexar.cli import convert as command

    weights = {"w": torch.randn(2, 2), "b": torch.randn(2), "step": torch.tensor(7)}
    torch.save({"model": weights, "optimizer": {}}, tmp_path / "official.pt")
    model = convert("double", tmp_path / "official.pt")
    assert torch.equal(model.weight, weights["w"]) and torch.equal(model.bias, weights["b"]) and not model.training
    with pytest.raises(ValueError, match="unexpected key\(s\) the converter does not know: 'extra'"):
        convert("double", {**weights, "extra": torch.zeros(1)})
    with pytest.raises(KeyError, match="no key 'b'"):
        convert("double", {"w": weights["w"]})
    with pytest.raises(ValueError, match="unknown double preset 'huge'; known: double"):
        convert("double", weights, preset="huge")
    with pytest.raises(ValueError, match="unknown checkpoint format 'nope'; known formats: .*double"):
        convert("nope", weights)
    # the command: a Linear is no registered flexar class, so the folder writer is swapped for a recorder
    import flexar.hub

    saved = {}
    monkeypatch.setattr(flexar.hub, "save_model", lambda model, output: saved.setdefault("folder", output))
    monkeypatch.setattr(flexar.hub, "fingerprint", lambda folder: "f")
    assert command.main(["double", str(tmp_path / "official.pt"), str(tmp_path / "out")]) == 0
    assert saved == {"folder": str(tmp_path / "out")} and DoubleFormat.built_with == {}
    printed = json.loads(capsys.readouterr().out)
    assert printed == {"output": str(tmp_path / "out"), "class": "Linear", "preset": "double", "parameters": 6,
                       "fingerprint": "f"}
    # size and tokenizer options reach the format's build; a format whose model takes neither refuses them there
    assert command.main(["double", str(tmp_path / "official.pt"), str(tmp_path / "out2"), "--image-size", "384",
                         "--tokenizer", "tok"]) == 0
    assert DoubleFormat.built_with == {"image_size": 384, "tokenizer": "tok"}


def test_the_command_names_bad_formats_and_files(tmp_path, capsys, double_format):
    with pytest.raises(SystemExit):
        convert_main(["not-a-format", "x.pt", str(tmp_path / "out")])
    assert "invalid choice: 'not-a-format'" in capsys.readouterr().err
    assert convert_main(["--list"]) == 0
    assert "double: double" in capsys.readouterr().out
    assert convert_main(["double", str(tmp_path / "absent.pt"), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    assert convert_main(["double", str(tmp_path / "absent.pt"), str(tmp_path / "busy")]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    torch.save({"model": {"w": torch.zeros(2, 2)}}, tmp_path / "short.pt")
    assert convert_main(["double", str(tmp_path / "short.pt"), str(tmp_path / "out")]) == 2
    assert "has no key 'b' (missing key)" in capsys.readouterr().err

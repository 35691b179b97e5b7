"""Import structure: inference stays free of the training stack, and flexar's subpackages import in one direction.

The layers, bottom to top: ``flexar.utils`` (leaf helpers), ``nn`` / ``quantizers``, ``hub`` (save / load, the
registry), ``sampling`` (logit processors, samplers, decoding strategies), ``tokenizers``, ``generators``, then
``data``, ``train``, ``eval``, and at the top ``pipeline``, ``cli`` and the root package.

The hub's registry is the one place that imports by a computed name: a config's class name it does not know yet is
looked up by importing the packages of ``flexar.hub.FAMILY_PACKAGES`` in order (never the name itself). The hub
runs without them (they import it, to register), so that lookup is not an edge of the graph below.
"""
import ast
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import torch

from flexar import Pipeline
from flexar.generators import RasterAR
from flexar.hub import model_fingerprint
from flexar.tokenizers import TiTok

PACKAGE = Path(__file__).resolve().parents[1] / "flexar"
TRAINING_STACK = ("lightning", "pytorch_lightning", "torch_fidelity")

# Lazy imports that still point up the layers, each a dependency of one function rather than of its module:
# (importing module, imported module) -> why it is there. Every entry must still exist (a removed import is taken off
# this list), and no cycle may run through anything not listed.
UPWARD_LAZY_IMPORTS = {
    ("flexar.tokenizers.retok", "flexar.eval.classifier"):
        "ReTok's 'classifier:PATH' teacher is read from a saved DigitClassifier folder",
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> str:
    """flexar.tokenizers.titok -> tokenizers; flexar.hub -> hub; flexar -> flexar (the root package)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


class _Imports(ast.NodeVisitor):
    """Every flexar module a file imports, at top level or inside a function: (imported module, line, deferred).

    Both count. A function-level import is still a dependency of its package, only paid later: a cycle hidden inside
    a function is still a cycle. ``if TYPE_CHECKING:`` blocks never run and are skipped; ``importlib.import_module``
    and ``__import__`` with a literal name count like an import statement.
    """

    def __init__(self, module: str, is_package: bool):
        self.package = module if is_package else module.rpartition(".")[0]
        self.found: list[tuple[str, int, bool]] = []
        self.depth = 0

    def _add(self, name: str, line: int) -> None:
        if name == "flexar" or name.startswith("flexar."):
            self.found.append((name, line, self.depth > 0))

    def _function(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_If(self, node):
        test = node.test
        if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
                isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"):
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_Import(self, node):
        for alias in node.names:
            self._add(alias.name, node.lineno)

    def visit_ImportFrom(self, node):
        if node.level:
            base = self.package.split(".")[: len(self.package.split(".")) - (node.level - 1)]
            module = ".".join(base + ([node.module] if node.module else []))
        else:
            module = node.module or ""
        if module == "flexar" or (not node.module and node.level):
            # `from flexar import tokenizers` / `from . import x` name submodules (or attributes of the package)
            for alias in node.names:
                self._add(f"{module}.{alias.name}", node.lineno)
        else:
            self._add(module, node.lineno)

    def visit_Call(self, node):
        function = node.func
        name = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", None)
        if name in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            if isinstance(node.args[0].value, str):
                self._add(node.args[0].value, node.lineno)
        self.generic_visit(node)


def _known_modules() -> set[str]:
    return {_module_name(path) for path in PACKAGE.rglob("*.py")}


def _resolve(name: str, known: set[str]) -> str:
    """The flexar module an imported name lives in: `flexar.Pipeline` -> `flexar`, `flexar.tokenizers.TiTok` ->
    `flexar.tokenizers`."""
    while name not in known and "." in name:
        name = name.rpartition(".")[0]
    return name


def import_edges() -> dict[tuple[str, str], list[str]]:
    """{(importing module, imported module): ["flexar/x.py:12 (in a function)", ...]} over every flexar file."""
    known = _known_modules()
    edges = defaultdict(list)
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        visitor = _Imports(module, path.name == "__init__.py")
        visitor.visit(ast.parse(path.read_text(), filename=str(path)))
        for name, line, deferred in visitor.found:
            target = _resolve(name, known)
            where = f"{path.relative_to(PACKAGE.parent)}:{line}" + (" (in a function)" if deferred else "")
            edges[(module, target)].append(where)
    return edges


def layer_cycles(edges) -> list[tuple[list[str], list[str]]]:
    """Cycles between layers: for each strongly connected component of more than one layer, (its layers, the
    shortest closed path through its first layer); every layer of the component is on some cycle."""
    graph = defaultdict(set)
    for source, target in edges:
        if _layer(source) != _layer(target):
            graph[_layer(source)].add(_layer(target))
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def connect(node):  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                connect(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(set(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    cycles = []
    for component in components:  # one closed path through the component, found breadth-first from its first layer
        start = min(component)
        paths = {start: [start]}
        queue = [start]
        while queue:
            node = queue.pop(0)
            for successor in sorted(graph[node] & component):
                if successor == start:
                    cycles.append((sorted(component), paths[node] + [start]))
                    queue = []
                    break
                if successor not in paths:
                    paths[successor] = paths[node] + [successor]
                    queue.append(successor)
    return cycles


def describe(found: tuple[list[str], list[str]], edges) -> str:
    layers, cycle = found
    lines = [f"{', '.join(layers)} import one another, e.g. {' -> '.join(cycle)}:"]
    for source_layer, target_layer in zip(cycle, cycle[1:]):
        for (source, target), where in sorted(edges.items()):
            if _layer(source) == source_layer and _layer(target) == target_layer:
                lines.append(f"    {source} imports {target}: {', '.join(where)}")
    return "\n".join(lines)


def test_no_import_cycle_between_subpackages():
    edges = import_edges()
    stale = sorted(pair for pair in UPWARD_LAZY_IMPORTS if pair not in edges)
    assert not stale, f"UPWARD_LAZY_IMPORTS lists imports that no longer exist, take them off: {stale}"
    for pair in UPWARD_LAZY_IMPORTS:
        assert all(where.endswith("(in a function)") for where in edges[pair]), (
            f"{pair[0]} imports {pair[1]} at top level: {edges[pair]}")
    checked = {pair: where for pair, where in edges.items() if pair not in UPWARD_LAZY_IMPORTS}
    cycles = layer_cycles(checked)
    assert not cycles, "import cycles between flexar's subpackages:\n" + "\n".join(describe(c, checked) for c in cycles)


def test_the_cycle_finder_reports_a_lazy_cycle_with_its_imports():
    edges = {("flexar.hub", "flexar.tokenizers"): ["flexar/hub.py:9 (in a function)"],
             ("flexar.tokenizers.titok", "flexar.hub"): ["flexar/tokenizers/titok.py:3"],
             ("flexar.pipeline", "flexar.hub"): ["flexar/pipeline.py:2"]}
    cycles = layer_cycles(edges)
    assert cycles == [(["hub", "tokenizers"], ["hub", "tokenizers", "hub"])]
    assert "flexar/hub.py:9 (in a function)" in describe(cycles[0], edges)


def test_shared_helpers_are_defined_once():
    definitions, public = defaultdict(list), defaultdict(list)
    for path in PACKAGE.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            names = [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else [
                target.id for target in getattr(node, "targets", []) if isinstance(target, ast.Name)]
            for name in names:
                if name != "__all__":
                    definitions[name.lstrip("_")].append(str(path.relative_to(PACKAGE.parent)))
                    if not name.startswith("_"):
                        public[name].append(str(path.relative_to(PACKAGE.parent)))
    for name in ("to_uint8", "psnr", "IGNORE_INDEX", "SamplingState", "GenerationOutput", "CONFIG_NAME",
                 "WEIGHTS_NAME"):
        assert len(definitions[name]) == 1, f"{name} is defined in {definitions[name]}"
    # every public name is defined in one module, except each command-line module's own `main` and `build_parser`
    # and the names every checkpoint-format module of flexar/convert declares (its contract, flexar.convert)
    per_module = {"main", "build_parser"}
    per_format = {"PRESETS", "CHECKPOINT_KEYS", "build", "load"}
    twice = {name: where for name, where in public.items() if len(where) > 1 and name not in per_module
             and not (name in per_format and all(place.startswith("flexar/convert/") for place in where))}
    assert not twice, f"defined in several modules: {twice}"


INFERENCE = """
import importlib, json, pkgutil, sys
import torch
from flexar import Pipeline
from flexar.hub import load_model
pipe = Pipeline.from_pretrained(sys.argv[1])
images = pipe.generate([0, 3], seed=1)
for package in ("flexar.nn", "flexar.quantizers", "flexar.sampling", "flexar.tokenizers", "flexar.generators"):
    for info in pkgutil.iter_modules(importlib.import_module(package).__path__):
        importlib.import_module(f"{package}.{info.name}")
loaded = sorted(name for name in sys.modules if name in {TRAINING_STACK})
try:  # an unknown class name: every family package is searched (the evaluation stack too), the name never imported
    load_model(sys.argv[2])
except ValueError as error:
    refused = str(error)
print(json.dumps({"shape": list(images.shape), "dtype": str(images.dtype), "loaded": loaded, "refused": refused,
                  "imported_by_name": "json.tool" in sys.modules}))
"""


def test_inference_does_not_import_the_training_stack(tmp_path):
    torch.manual_seed(0)
    tokenizer = TiTok(image_size=16, channels=1, patch_size=4, num_latent_tokens=6, width=32, depth=1, num_heads=2,
                      codebook_size=32, code_dim=8)
    generator = RasterAR(vocab_size=32, max_tokens=6, num_classes=10, dim=32, depth=1, num_heads=2)
    generator.provenance = {"tokenizer_fingerprint": model_fingerprint(tokenizer)}
    Pipeline(tokenizer, generator).save_pretrained(tmp_path / "pipe")
    # a config that names a module is refused by name, without importing what it names
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({"class": "json.tool", "kwargs": {}}))
    script = INFERENCE.replace("{TRAINING_STACK}", repr(set(TRAINING_STACK)))
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "pipe"), str(foreign)], check=True,
                         capture_output=True, text=True, cwd=tmp_path)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["shape"] == [2, 3, 16, 16] and result["dtype"] == "torch.uint8"
    assert result["loaded"] == [], f"inference imported {result['loaded']}"
    assert "field 'class' names 'json.tool', which is not a registered flexar model" in result["refused"]
    assert not result["imported_by_name"]


REGISTRY = """
import json
from flexar.hub import registered
print(json.dumps(sorted(registered())))
"""


def test_importing_flexar_registers_every_family():
    # a bare `from flexar.hub import ...` in a fresh interpreter knows every class flexar's source registers
    declared = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                    getattr(decorator, "id", None) == "register" for decorator in node.decorator_list):
                declared.add(node.name)
    out = subprocess.run([sys.executable, "-c", REGISTRY], check=True, capture_output=True, text=True)
    assert set(json.loads(out.stdout.strip().splitlines()[-1])) == declared

"""scripts/benchmark.py end to end in --quick mode: the JSON it prints, its progress bars, the verdicts it withholds,
its handling of unknown names, and the table of benchmarks and durations it lists.

Only structure and sanity of the numbers are checked here; speeds are recorded by full runs, never asserted.
"""
import json
import math
import pathlib
import subprocess
import sys

import pytest
import torch

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "benchmark.py"
MACHINE_KEYS = {"date", "git_commit", "torch", "device", "device_name", "cores", "threads"}


def run_benchmark(*arguments: str) -> subprocess.CompletedProcess:
    # a hang guard, not a time limit: quick runs take about 20 s alone, several times that on a busy machine
    return subprocess.run(
        [sys.executable, str(SCRIPT), *arguments], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600
    )


def tracked_results() -> dict:
    return {path.name: path.stat().st_mtime_ns for path in (REPO_ROOT / "benchmarks" / "results").iterdir()}


def verdicts(value, path: str = "") -> list[str]:
    """The paths of every bar-verdict key (meets_*, beats_*) in a record, at any depth."""
    found = []
    if isinstance(value, dict):
        for key, item in value.items():
            if str(key).startswith(("meets_", "beats_")):
                found.append(f"{path}/{key}")
            found += verdicts(item, f"{path}/{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += verdicts(item, f"{path}/{index}")
    return found


def quick_run(name: str) -> tuple[dict, str]:
    """The record a --quick --json run prints (checked for what every record holds), and its stderr."""
    before = tracked_results()
    result = run_benchmark(name, "--quick", "--json", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert tracked_results() == before, "a test run must leave benchmarks/results/ alone"
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout  # progress bars go to stderr
    record = json.loads(lines[0])
    assert record["benchmark"] == name and record["quick"] is True
    assert MACHINE_KEYS <= set(record["machine"]) and record["machine"]["device"] == "cpu"
    assert {"config", "summary", "rows"} <= set(record) and record["rows"]
    assert verdicts(record) == [], "a quick run must not report bar verdicts"
    return record, result.stderr


def quick_record(name: str) -> dict:
    return quick_run(name)[0]


def positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def test_attention_quick():
    record = quick_record("attention")
    config, rows = record["config"], record["rows"]
    assert config["backends"][:3] == ["math", "sdpa", "flex_eager"]
    assert set(config["skipped"]) == {"flex_compiled", "xformers"}
    cases = {(row["length"], row["mask"], row["backend"]) for row in rows}
    expected = {
        (length, mask, backend)
        for length in config["lengths"]
        for mask in ("none", "causal", "block_causal")
        for backend in config["backends"]
    }
    assert cases == expected
    for row in rows:
        assert positive(row["seconds"]) and positive(row["speedup_vs_math"]) and positive(row["first_call_seconds"])
        assert math.isfinite(row["max_abs_diff"]) and row["matches_math"] is True
    assert record["summary"]["all_match_math"] is True
    for backend in ("sdpa", "flex_eager"):
        assert all(positive(ratio) for ratio in record["summary"]["speedup_vs_math"][backend].values())


def test_kv_cache_quick():
    record, stderr = quick_run("kv_cache")
    summary = record["summary"]
    # full runs report meets_target; this one keeps the bar itself but not the verdict
    assert summary["target_speedup"] > 0 and "kv_cache: cached vs recompute" in stderr
    for key in ("cached_tokens_per_second", "recompute_tokens_per_second", "speedup"):
        assert positive(summary[key]), key
    assert summary["tokens_match"] is True and summary["last_step_max_abs_diff"] <= record["config"]["tolerance"]
    assert [row["path"] for row in record["rows"]] == ["cached", "recompute"]
    for row in record["rows"]:
        assert positive(row["seconds"]) and positive(row["tokens_per_second"])


def test_unknown_name_lists_known_benchmarks():
    result = run_benchmark("no_such_benchmark", "--json")
    assert result.returncode != 0
    assert "no_such_benchmark" in result.stderr
    for known in ("attention", "kv_cache"):
        assert known in result.stderr


def test_generate_quick():
    record = quick_record("generate")
    summary = record["summary"]
    assert positive(summary["cached_images_per_second"]) and positive(summary["recompute_images_per_second"])
    # one forward pass per token with the cache (prefill included), whatever the speed
    assert summary["forward_passes_per_batch"] == record["config"]["max_tokens"]
    assert [row["path"] for row in record["rows"]] == ["cached", "recompute"]


def test_token_shuffle_quick():
    record, stderr = quick_run("token_shuffle")
    summary = record["summary"]
    for bar in ("token_shuffle: train raster", "token_shuffle: train token_shuffle", "token_shuffle: decoding"):
        assert bar in stderr, bar
    assert summary["token_shuffle_sequence_length"] < summary["raster_sequence_length"]
    assert positive(summary["speedup"])


def test_nar_linear_split_counts_every_linear_call():
    """The NAR benchmark's linear-time split sees each Linear once per pass, with the rows the pass feeds."""
    import torch

    sys.path.insert(0, str(REPO_ROOT))
    from benchmarks.nar import build_pair, linear_calls, matmul_seconds
    from flexar.sampling import Sampler

    sizes = dict(dim=16, depth=2, num_heads=2, vocab_size=32, num_classes=10)
    raster, nar = build_pair(4, sizes, "cpu")
    labels = torch.arange(3)
    calls = linear_calls(raster, lambda: raster.generate(labels, Sampler(), torch.Generator().manual_seed(0)))
    # 4 linears per block + the head, once per pass (16 passes), and always 3 rows (the KV cache feeds one token)
    assert sum(calls.values()) == 16 * (4 * 2 + 1)
    assert {rows for (_, rows) in calls} == {3}
    calls = linear_calls(nar, lambda: nar.generate(labels, Sampler(), torch.Generator().manual_seed(0)))
    # the output layers run on the gathered source rows of each target: every grid cell once
    head_rows = sum(rows * count for (module, rows), count in calls.items() if module is nar.head)
    assert head_rows == 3 * 16
    assert matmul_seconds(calls, "cpu") > 0


def test_tokens_vs_quality_quick():
    record, stderr = quick_run("tokens_vs_quality")
    config, summary, rows = record["config"], record["summary"], record["rows"]
    flexible = {"onedpiece", "flextok", "retok"}
    # the beats_* verdicts are withheld; the numbers they compare are all there, TiTok's three decodes among them
    assert set(summary["mse_at_k1"]) == flexible | {"titok:pad", "titok:cut", "titok:mean"}
    assert set(summary["titok_best_fair_fill"]["mse"]) == {str(k) for k in config["num_tokens_evaluated"]}
    # bars from Lightning training (a Trainer, and flexar-train through the CLI) and from plain loops
    for bar in ("FID classifier", "train titok", "evaluate retok", "generator", "gFID"):
        assert f"tokens_vs_quality: {bar}" in stderr, bar
    tokenizer_rows = [row for row in rows if not row["tokenizer"].startswith("raster AR")]
    assert {row["tokenizer"] for row in tokenizer_rows} == flexible | {"titok"}
    assert all(positive(row["mse"]) and positive(row["mse_mean_decode"]) and positive(row["rfid"]) for row in tokenizer_rows)
    assert {row["num_tokens"] for row in tokenizer_rows} == set(config["num_tokens_evaluated"])
    assert set(summary["gfid_by_k"]) == {str(k) for k in config["num_tokens_evaluated"]}


def load_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmark_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_full_runs_write_under_runs_and_record_only_when_asked(tmp_path):
    script = load_script()
    assert script.output_path("nar", quick=False, record=False, output=None) == REPO_ROOT / "runs" / "benchmarks" / "nar.json"
    assert script.output_path("nar", quick=False, record=True, output=None) == REPO_ROOT / "benchmarks" / "results" / "nar.json"
    assert script.output_path("nar", quick=True, record=False, output=None) is None
    assert script.output_path("nar", quick=True, record=False, output=tmp_path / "a.json") == tmp_path / "a.json"
    for quick, output in ((True, None), (False, tmp_path / "a.json")):
        try:
            script.output_path("nar", quick=quick, record=True, output=output)
        except ValueError as error:
            assert "--record" in str(error)
        else:
            raise AssertionError("refused combination accepted")
    result = run_benchmark("attention", "--quick", "--record")
    assert result.returncode != 0 and "--record keeps full runs only" in result.stderr


class FakeBenchmark:
    """A benchmark whose summary and rows hold verdicts at several depths."""

    @staticmethod
    def run(quick: bool, device: str) -> dict:
        return {
            "config": {"quick": quick},
            "summary": {"speedup": 2.0, "target_speedup": 5.0, "meets_target": False, "meets_fid_target": True,
                        "beats_baseline_at_k": {"a": True}, "by_width": {"w": {"speedup": 1.5, "meets_target": False}}},
            "rows": [{"case": 1, "beats_baseline": True, "matches_math": True}],
        }


def test_quick_runs_withhold_every_verdict_whatever_the_benchmark(tmp_path, monkeypatch, capsys):
    """The script, not each benchmark, drops meets_* / beats_* from a quick run (nar, npp, scalingar, speculative
    and token_shuffle report them in full runs); a full run keeps them."""
    script = load_script()
    monkeypatch.setattr(script, "BENCHMARKS", {**script.BENCHMARKS, "fake": "fake"})
    monkeypatch.setattr(script, "load", lambda name: FakeBenchmark)
    assert script.main(["fake", "--quick", "--json", "--device", "cpu"]) == 0
    quick = json.loads(capsys.readouterr().out)
    assert quick["quick"] is True and verdicts(quick) == []
    assert quick["summary"] == {"speedup": 2.0, "target_speedup": 5.0, "by_width": {"w": {"speedup": 1.5}}}
    assert quick["rows"] == [{"case": 1, "matches_math": True}]
    assert script.main(["fake", "--json", "--device", "cpu", "--output", str(tmp_path / "fake.json")]) == 0
    full = json.loads(capsys.readouterr().out)
    assert full["quick"] is False and set(verdicts(full)) == {
        "/summary/meets_target", "/summary/meets_fid_target", "/summary/beats_baseline_at_k",
        "/summary/by_width/w/meets_target", "/rows/0/beats_baseline"}
    assert json.loads((tmp_path / "fake.json").read_text()) == full


def test_every_benchmark_is_listed_with_its_durations_and_the_readme_table_matches():
    script = load_script()
    from benchmarks import ABOUT, BENCHMARKS

    assert set(ABOUT) == set(BENCHMARKS), "every benchmark needs one entry in benchmarks.ABOUT, and only those"
    for name, about in ABOUT.items():
        assert about.measures and "\n" not in about.measures, name
        assert positive(about.quick_seconds), name
        record = REPO_ROOT / "benchmarks" / "results" / f"{name}.json"
        if record.is_file():  # the table's full-run duration is the recorded one, give or take the machine's load
            recorded = json.loads(record.read_text())["wall_seconds"]
            assert positive(about.full_seconds) and 0.5 <= about.full_seconds / recorded <= 2, (name, recorded)
        else:
            assert about.full_seconds is None, f"{name}: a full-run duration without a record to take it from"
    readme = (REPO_ROOT / "benchmarks" / "README.md").read_text()
    start, end = readme.index(script.TABLE_START), readme.index(script.TABLE_END)
    assert readme[start + len(script.TABLE_START) : end].strip() == script.list_markdown(), (
        "benchmarks/README.md's table differs from benchmarks.ABOUT: paste in `scripts/benchmark.py --list markdown`"
    )
    listed = run_benchmark("--list")
    assert listed.returncode == 0, listed.stderr
    for name, about in ABOUT.items():
        durations = script.format_duration(about.full_seconds), script.format_duration(about.quick_seconds)
        assert "full run {}, --quick {}".format(*durations) in listed.stdout, name
        assert about.measures.split()[0] in listed.stdout, name
    assert script.format_duration(92) == "~2 min" and script.format_duration(6543) == "~1 h 50 min"
    assert script.format_duration(30.4) == "~30 s" and script.format_duration(7200) == "~2 h"
    assert script.format_duration(None) == "not recorded"


def test_adaptive_quick():
    record, stderr = quick_run("adaptive")
    config, summary = record["config"], record["summary"]
    datasets = set(config["datasets"])
    for bar in ("train base", "train karl", "train alit", "encode speed", "FID classifier", "generator on karl", "gFID"):
        assert f"adaptive: {bar}" in stderr, bar
    for name in ("karl", "alit"):
        assert set(summary[name]) == datasets
        for dataset, entry in summary[name].items():
            rho = entry["complexity_spearman"]
            assert rho is None or -1 <= rho <= 1, (name, dataset)
            # at least three requested errors, each a fraction of the images
            assert len(entry["calibration"]) >= 3 and all(0 <= v <= 1 for v in entry["calibration"].values())
            assert 1 <= entry["mean_tokens"] <= entry["max_tokens"] and positive(entry["encode_images_per_second"])
            assert positive(entry["encode_speedup_vs_alit"])
    assert all(summary["alit"][dataset]["encode_speedup_vs_alit"] == 1.0 for dataset in datasets)
    generation = summary["adaptive_generation"]["karl"][config["generation_dataset"]]
    assert positive(generation["gfid_adaptive"]) and positive(generation["gfid_fixed_titok"])
    assert 0 <= generation["length_tv"] <= 1
    # the same network but the end-of-sequence row of the head, at the cache's mean length
    assert generation["adaptive_generator_parameters"] - generation["fixed_generator_parameters"] == config["generator_dim"]
    assert generation["titok_tokens"] == max(1, round(generation["data_mean_tokens"]))
    assert {(row["tokenizer"], row["dataset"]) for row in record["rows"]} >= {
        (name, dataset) for name in ("karl", "alit") for dataset in datasets}


def test_mvar_quick():
    record = quick_record("mvar")
    config, summary, rows = record["config"], record["summary"], record["rows"]
    # one forward pass per scale for both families: VAR through its KV cache, MVAR on each map alone
    assert summary["forward_passes"] == {"var": len(config["scales"]), "mvar": len(config["scales"])}
    assert {(row["mode"], row["family"]) for row in rows} == {(mode, family) for mode in ("train", "generate", "fid")
                                                              for family in ("var", "mvar")}
    train = {row["family"]: row for row in rows if row["mode"] == "train"}
    # sample quality: both generators trained with one budget on one tokenizer, scored with the same features
    fid = {row["family"]: row for row in rows if row["mode"] == "fid"}
    assert fid["var"]["parameters"] == fid["mvar"]["parameters"]
    assert summary["fid"] == {family: fid[family]["fid"] for family in ("var", "mvar")}
    assert summary["fid_ratio_mvar_over_var"] == pytest.approx(fid["mvar"]["fid"] / fid["var"]["fid"])
    assert positive(summary["rfid"]) and fid["var"]["rfid"] == summary["rfid"]
    usage = summary["codebook_usage_per_scale"]
    assert list(usage) == [str(side) for side in config["fid"]["scales"]]
    # every scale uses some of the codebook, never more than all of it
    assert all(0 < share <= 1 for share in usage.values())
    assert "meets_mvar_fid_within_10_percent" not in summary  # a quick run carries no verdicts
    # MVAR attends within a scale (and a k x k neighbourhood), so it saves fewer bytes for backward than VAR
    assert 0 < train["mvar"]["saved_mib"] < train["var"]["saved_mib"]
    assert summary["train_saved_activation_ratio"] == pytest.approx(train["var"]["saved_mib"] / train["mvar"]["saved_mib"])
    for key in ("train_memory_ratio", "generate_memory_ratio", "generate_speedup"):
        assert positive(summary[key]), key


def test_decode_quick():
    record = quick_record("decode")
    config, summary, rows = record["config"], record["summary"], record["rows"]
    families = ("raster", "token_shuffle", "nar", "raster_grid")
    assert {(row["family"], row["batch"]) for row in rows} == {
        (family, batch) for family in families for batch in config["batches"]} | {
        ("speculative_eagle", batch) for batch in config["speculative_batches"]}
    decoding = [row for row in rows if row["family"] in families]
    assert summary["same_tokens"] and all(row["same_tokens"] for row in decoding)
    side = config["nar_grid"]
    for row in decoding:
        cells = {"raster": config["tokens"], "token_shuffle": config["shuffle_grid"] ** 2}.get(row["family"], side * side)
        assert row["tokens"] == row["batch"] * cells
        for key in ("eager_seconds", "compiled_seconds", "compile_speedup", "matmul_seconds", "eager_over_floor"):
            assert positive(row[key]), (row["family"], key)
        # the profiled products of one eager call take no longer than the call itself
        assert row["matmul_seconds"] + row["attention_seconds"] <= row["eager_seconds"] * 3
    by = {(row["family"], row["batch"]): row for row in rows}
    for batch in config["batches"]:
        assert by["nar", batch]["forward_passes"] == 2 * side - 1 and by["raster_grid", batch]["forward_passes"] == side * side
        assert summary[f"nar_over_raster_compiled_batch{batch}"] == pytest.approx(
            by["raster_grid", batch]["compiled_seconds"] / by["nar", batch]["compiled_seconds"])
    for batch in config["speculative_batches"]:
        row = by["speculative_eagle", batch]
        # plain decoding takes one target pass per token; exact speculative decoding commits >= 1 token per pass
        assert row["plain_target_passes_per_batch"] == row["tokens_per_image"]
        assert 1 <= row["speculative_target_passes_per_batch"] <= row["tokens_per_image"]
        assert summary[f"speculative_compiled_speedup_batch{batch}"] == row["speedup_vs_plain_compiled"]
    assert summary["compile_speedup_batch1"] == rows[0]["compile_speedup"]
    assert "meets_compile_speedup_batch1" not in summary and "skipped" not in config


def test_gpu_quick():
    record = quick_record("gpu")
    config, summary, rows = record["config"], record["summary"], record["rows"]
    cases = {}
    for row in rows:
        cases.setdefault(row["case"], []).append(row)
    assert set(cases) == {"decode", "nar", "train", "speculative", "attention"}
    assert [row["batch"] for row in cases["decode"]] == config["batches"]
    for row in cases["decode"]:
        assert row["tokens"] == row["batch"] * config["side"] ** 2
        assert positive(row["compiled_tokens_per_second"]) and positive(row["compile_speedup"])
    nar = {(row["family"], row["grid"][0]): row for row in cases["nar"]}
    assert set(nar) == {(family, side) for family in ("raster", "nar") for side in config["nar_sides"]}
    for side in config["nar_sides"]:
        assert nar["nar", side]["forward_passes"] == 2 * side - 1 and nar["raster", side]["forward_passes"] == side ** 2
        assert summary[f"nar_over_raster_{side}"] == nar["nar", side]["nar_over_raster"]
        assert positive(nar["nar", side]["images_per_second"]) and positive(summary[f"nar_over_raster_{side}"])
    train = cases["train"][0]
    assert positive(train["tokens_per_second"]) and train["mfu"] is None  # no bf16 peak for a CPU
    assert train["achieved_flops"] == pytest.approx(train["flops_per_token"] * train["tokens_per_second"])
    speculative = {row["family"]: row for row in cases["speculative"]}
    assert set(speculative) == {"plain", "speculative", "lantern"}
    assert speculative["plain"]["tokens_per_target_pass"] == 1.0
    assert all(row["tokens_per_target_pass"] >= 1.0 for row in speculative.values())
    assert {row["backend"] for row in cases["attention"]} >= {"math", "sdpa"} and summary["attention_all_match_math"]
    assert summary["device"] == record["machine"]["device_name"] and config["weights"] == "random"


def test_speculative_large_quick():
    record = quick_record("speculative_large")
    config, summary, rows = record["config"], record["summary"], record["rows"]
    by = {row["method"]: row for row in rows}
    assert set(by) == {"plain", "speculative"} | {f"lantern_k{k}_d{delta}" for k, delta in config["grid"]}
    tokens = config["tokens_per_image"]
    assert by["plain"]["tokens_per_target_pass"] == 1.0 and by["plain"]["target_passes_per_batch"] == tokens
    for row in rows:
        assert 1.0 <= row["tokens_per_target_pass"] <= tokens and positive(row["fid"])
        assert positive(row["seconds_per_image_batch1"])
        assert row["tokens_per_target_pass"] == pytest.approx(tokens / row["target_passes_per_batch"])
    if summary["best_lantern"] is not None:
        best = by[summary["best_lantern"]]
        assert best["fid"] <= (1 + config["fid_tolerance"]) * by["speculative"]["fid"]
        assert summary["lantern_tokens_per_pass_ratio"] == pytest.approx(
            best["tokens_per_target_pass"] / by["speculative"]["tokens_per_target_pass"])
    assert "meets_lantern_tokens_per_pass_ratio" not in summary and config["codebook_size"] == config["vq"]["codebook_size"]


def test_xar_quick():
    record = quick_record("xar")
    config, summary, rows = record["config"], record["summary"], record["rows"]
    by = {row["model"]: row for row in rows}
    assert set(by) == set(config["variants"]) | {"raster_vq2d"}
    # one parameter count for every entity; network calls = entities x flow steps per image
    assert len({row["parameters"] for row in rows if row["family"] == "xar"}) == 1
    for row in rows:
        expected = row["entities"] * config["flow_steps"] if row["family"] == "xar" else row["entities"]
        assert row["forward_passes"] == expected, row["model"]
        assert positive(row["fid"]) and positive(row["rfid"]), row["model"]
    assert by["token"]["entities"] == 16 and by["image"]["entities"] == 1 and not by["cell4_clean_context"]["noisy_context"]


def test_a_benchmarks_models_folder_trains_once_and_reloads_the_same_model(tmp_path):
    from benchmarks.common import Models
    from flexar.generators import RasterAR

    calls = []

    def train():
        calls.append(1)
        torch.manual_seed(0)
        return RasterAR(vocab_size=8, max_tokens=4, num_classes=2, dim=16, depth=1, num_heads=2).eval()

    first = Models(str(tmp_path / "models"), tmp_path / "scratch")
    model = first.get("raster", train)
    assert calls == [1] and first.loaded == [] and first.seconds("raster") > 0
    again = Models(str(tmp_path / "models"), tmp_path / "scratch")
    loaded = again.get("raster", train)
    assert calls == [1] and again.loaded == ["raster"]  # read back, not retrained
    assert again.seconds("raster") == pytest.approx(first.seconds("raster"))  # its training time travels with it
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    # without a folder every model trains, in the scratch folder
    scratch = Models(None, tmp_path / "scratch2")
    scratch.get("raster", train)
    assert calls == [1, 1] and (tmp_path / "scratch2" / "models" / "raster" / "config.json").is_file()


def _tiny_generator():
    from flexar.generators import RasterAR

    torch.manual_seed(0)
    return RasterAR(vocab_size=8, max_tokens=4, num_classes=2, dim=16, depth=1, num_heads=2, class_dropout=0.5)


def _token_data():
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 8, (64, 4), generator=generator), torch.randint(0, 2, (64,), generator=generator)


def test_fit_resumed_from_its_checkpoint_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, monkeypatch):
    from benchmarks.common import fit

    ids, labels = _token_data()
    train = dict(steps=8, batch_size=16, lr=1e-2, warmup=2, device="cpu", description="test", labels=labels)
    straight, _ = fit(_tiny_generator(), ids, **train)

    checkpoint = tmp_path / "raster.partial.pt"
    model = _tiny_generator()
    original = type(model).training_loss
    calls = []

    def failing(self, *arguments, **keywords):  # the sixth step dies, as a killed process would
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return original(self, *arguments, **keywords)

    monkeypatch.setattr(type(model), "training_loss", failing)
    with pytest.raises(KeyboardInterrupt):
        fit(model, ids, checkpoint=checkpoint, checkpoint_seconds=0.0, **train)
    monkeypatch.setattr(type(model), "training_loss", original)
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["step"] == 5 and saved["seconds"] > 0

    resumed, _ = fit(_tiny_generator(), ids, checkpoint=checkpoint, checkpoint_seconds=0.0, **train)
    # class dropout draws from torch's global stream and batches from fit's own: both are restored
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match=r"raster\.partial\.pt was saved by another training recipe.*'steps': 8"):
        fit(_tiny_generator(), ids, checkpoint=checkpoint, **dict(train, steps=9))


KILLED_TRAINING = """
import sys, torch
torch.set_num_threads(1)
sys.path[:0] = [sys.argv[2], sys.argv[2] + "/tests"]
from test_benchmarks import _tiny_generator, _token_data
from benchmarks.common import Models, fit
ids, labels = _token_data()
models = Models(sys.argv[1], None)
models.get("raster", lambda: fit(_tiny_generator(), ids, 500, 16, 1e-2, 2, "cpu", "killed", labels=labels,
                                 checkpoint=models.checkpoint("raster"), checkpoint_seconds=0.02)[0])
"""


def test_a_killed_benchmark_training_resumes_from_its_checkpoint(tmp_path):
    """SIGKILL a process training a benchmark model; Models.get in a new one resumes it, counts the seconds of both
    runs and ends with the weights of a run that was never stopped."""
    import signal
    import time

    from benchmarks.common import Models, fit

    folder = tmp_path / "models"
    process = subprocess.Popen([sys.executable, "-c", KILLED_TRAINING, str(folder), str(REPO_ROOT)],
                               stderr=subprocess.DEVNULL)
    checkpoint = folder / "raster.partial.pt"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if checkpoint.is_file() and torch.load(checkpoint, weights_only=True)["step"] >= 20:
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert checkpoint.is_file(), "the training ended or never checkpointed before the kill"
    killed_at = torch.load(checkpoint, weights_only=True)
    assert 20 <= killed_at["step"] < 500 and not (folder / "raster" / "config.json").exists()

    ids, labels = _token_data()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        models = Models(str(folder), tmp_path / "scratch")
        resumed = models.get("raster", lambda: fit(_tiny_generator(), ids, 500, 16, 1e-2, 2, "cpu", "resumed",
                                                    labels=labels, checkpoint=models.checkpoint("raster"))[0])
        straight, _ = fit(_tiny_generator(), ids, 500, 16, 1e-2, 2, "cpu", "straight", labels=labels)
    finally:
        torch.set_num_threads(threads)
    assert not checkpoint.exists() and (folder / "raster" / "config.json").is_file()
    assert models.seconds("raster") >= killed_at["seconds"]  # the killed run's training is counted
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name

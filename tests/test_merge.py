"""The sanitize merge method through the real mergekit: CLI, Python API, checks, provenance."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from tiny_models import bert_variants, llama_variants

from mergekit_backdoor.merge.provenance import MANIFEST_NAME


def load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def reference_merge(paths: list[Path], weights: list[float] | None = None) -> dict[str, torch.Tensor]:
    """The float32 weighted mean computed with plain torch."""
    models = [load_tensors(p) for p in paths]
    weights = weights or [1.0] * len(paths)
    total = sum(weights)
    return {
        key: sum(w * m[key].float() for w, m in zip(weights, models, strict=True)) / total
        for key in models[0] if models[0][key].is_floating_point()
    }


def write_recipe(path: Path, suspect: Path, donors: list[Path], weights=None, **parameters) -> Path:
    models = [suspect, *donors]
    entries = []
    for index, model in enumerate(models):
        entry: dict = {"model": str(model)}
        if weights is not None:
            entry["parameters"] = {"weight": weights[index]}
        entries.append(entry)
    recipe = {"merge_method": "sanitize", "base_model": str(suspect), "models": entries}
    if parameters:
        recipe["parameters"] = parameters
    path.write_text(yaml.safe_dump(recipe))
    return path


def mergekit_yaml(recipe: Path, out: Path, *extra: str, env: dict | None = None):
    return subprocess.run(
        ["mergekit-yaml", str(recipe), str(out), "--quiet", *extra],
        capture_output=True, text=True, env={**os.environ, **(env or {})},
    )


def sha256_tree(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def berts(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("bert")
    paths = bert_variants(root, ["suspect", "donor_a", "donor_b"])
    config = json.loads((paths[0] / "config.json").read_text())
    config["finetuning_task"] = "suspect-task"  # only the suspect has it: must reach the output
    (paths[0] / "config.json").write_text(json.dumps(config))
    return paths


def test_stock_mergekit_yaml_runs_sanitize_and_matches_torch_mean(berts, tmp_path):
    before = {p.name: sha256_tree(p) for p in berts}
    recipe = write_recipe(tmp_path / "wag.yml", berts[0], berts[1:])
    result = mergekit_yaml(recipe, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    merged, expected = load_tensors(out), reference_merge(berts)
    assert set(merged) >= set(expected)
    assert any(k.startswith("classifier") for k in merged) and any("pooler" in k for k in merged)
    for key, value in expected.items():
        assert merged[key].dtype == torch.float32
        assert (merged[key] - value).abs().max().item() <= 1e-6, key
    config = json.loads((out / "config.json").read_text())
    assert config["finetuning_task"] == "suspect-task"
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    assert {p.name: sha256_tree(p) for p in berts} == before  # inputs untouched


def test_weights_are_respected(berts, tmp_path):
    weights = [0.5, 2.0, 1.0]
    recipe = write_recipe(tmp_path / "w.yml", berts[0], berts[1:], weights=weights)
    assert mergekit_yaml(recipe, tmp_path / "out").returncode == 0
    merged, expected = load_tensors(tmp_path / "out"), reference_merge(berts, weights)
    for key, value in expected.items():
        assert (merged[key] - value).abs().max().item() <= 1e-6, key


@pytest.mark.parametrize("aggregate", ["median", "trimmed_mean"])
def test_robust_aggregates_through_python_api(berts, tmp_path, aggregate):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    recipe = write_recipe(tmp_path / "r.yml", berts[0], berts[1:], aggregate=aggregate, trim=0.34)
    config = MergeConfiguration.model_validate(yaml.safe_load(recipe.read_text()))
    run_merge(config, str(tmp_path / "out"), options=MergeOptions(quiet=True))
    merged = load_tensors(tmp_path / "out")
    inputs = [load_tensors(p) for p in berts]
    for key, value in merged.items():
        if not value.is_floating_point():
            continue
        stack = torch.stack([m[key].float() for m in inputs])
        if aggregate == "median":
            expected = stack.median(0).values  # three inputs: the middle value
        else:  # trim 0.34 of three equal weights: only the middle value survives
            expected = stack.median(0).values
        assert torch.allclose(value, expected, atol=1e-6), key
    manifest = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())
    assert manifest["parameters"]["aggregate"] == aggregate


def test_manifest_and_model_card(berts, tmp_path):
    recipe = write_recipe(tmp_path / "wag.yml", berts[0], berts[1:])
    assert mergekit_yaml(recipe, tmp_path / "out").returncode == 0
    manifest = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())
    assert manifest["suspect"]["reference"] == str(berts[0])
    assert [d["reference"] for d in manifest["donors"]] == [str(p) for p in berts[1:]]
    suspect_file = berts[0] / "model.safetensors"
    assert manifest["suspect"]["files"][str(suspect_file)] == hashlib.sha256(
        suspect_file.read_bytes()).hexdigest()
    assert manifest["weights"] == {str(p): 1.0 for p in berts}
    assert {"mergekit", "torch", "transformers", "mergekit-backdoor"} <= set(manifest["versions"])
    assert yaml.safe_load(manifest["recipe"])["merge_method"] == "sanitize"
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Backdoor sanitization" in card and str(berts[1]) in card


def test_output_loads_with_transformers(berts, tmp_path):
    from transformers import AutoModelForSequenceClassification

    recipe = write_recipe(tmp_path / "wag.yml", berts[0], berts[1:])
    assert mergekit_yaml(recipe, tmp_path / "out").returncode == 0
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    logits = model(input_ids=torch.tensor([[1, 5, 7, 2]])).logits
    assert logits.shape == (1, 2) and torch.isfinite(logits).all()


# --- bad input: one-line error naming the model and field, no output, inputs unchanged ----------


def _corrupt(tmp_path: Path, source: Path, name: str, edit) -> Path:
    import shutil

    target = tmp_path / name
    shutil.copytree(source, target)
    edit(target)
    return target


def _edit_config(**changes):
    def edit(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        config.update(changes)
        (folder / "config.json").write_text(json.dumps(config))
    return edit


def _edit_tensors(edit_state):
    def edit(folder: Path) -> None:
        state = load_file(folder / "model.safetensors")
        edit_state(state)
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return edit


def _to_pickle(folder: Path) -> None:
    state = load_file(folder / "model.safetensors")
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


BAD_DONORS = {
    "architecture": (_edit_config(architectures=["RobertaForSequenceClassification"]),
                     "architecture RobertaForSequenceClassification differs"),
    "num_labels": (_edit_config(id2label={"0": "a", "1": "b", "2": "c"},
                                label2id={"a": 0, "b": 1, "c": 2}), "num_labels 3 differs"),
    "label_order": (_edit_config(id2label={"0": "positive", "1": "negative"},
                                 label2id={"positive": 0, "negative": 1}), "id2label order"),
    "vocab": (_edit_config(vocab_size=97), "vocab_size 97 differs"),
    "missing_tensor": (_edit_tensors(lambda s: s.pop("classifier.bias")),
                       "missing tensor classifier.bias"),
    "pickle": (_to_pickle, "pickle-only"),
    "nan": (_edit_tensors(lambda s: s["classifier.weight"].__setitem__((0, 0), float("nan"))),
            "NaN or Inf"),
}


@pytest.mark.parametrize("case", sorted(BAD_DONORS))
def test_bad_donor_is_refused_with_one_line_and_no_output(berts, tmp_path, case):
    edit, message = BAD_DONORS[case]
    bad = _corrupt(tmp_path, berts[1], f"bad_{case}", edit)
    before = sha256_tree(bad)
    recipe = write_recipe(tmp_path / "r.yml", berts[0], [bad, berts[2]])
    result = mergekit_yaml(recipe, tmp_path / "out")
    assert result.returncode != 0
    error_lines = [ln for ln in result.stderr.splitlines() if ln.startswith("Error:")]
    assert len(error_lines) == 1, result.stderr
    assert message in error_lines[0] and str(bad) in error_lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    assert sha256_tree(bad) == before


def test_pickle_weights_accepted_when_allowed(berts, tmp_path):
    bad = _corrupt(tmp_path, berts[1], "pickled", _to_pickle)
    recipe = write_recipe(tmp_path / "r.yml", berts[0], [bad, berts[2]])
    result = mergekit_yaml(recipe, tmp_path / "out", env={"MERGEKIT_BACKDOOR_ALLOW_PICKLE": "1"})
    assert result.returncode == 0, result.stderr


def test_existing_output_is_not_overwritten_unless_asked(berts, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    recipe = write_recipe(tmp_path / "r.yml", berts[0], berts[1:])
    result = mergekit_yaml(recipe, out)
    assert result.returncode != 0 and "output folder exists" in result.stderr
    assert (out / "keep.txt").read_text() == "precious"
    result = mergekit_yaml(recipe, out, env={"MERGEKIT_BACKDOOR_OVERWRITE": "1"})
    assert result.returncode == 0, result.stderr
    assert not (out / "keep.txt").exists() and (out / MANIFEST_NAME).exists()


@pytest.mark.parametrize(
    ("parameters", "message"),
    [({"wieght": 2}, "unknown sanitize parameter 'wieght'"),
     ({"aggregate": "mode"}, "aggregate 'mode' is not one of"),
     ({"aggregate": "median", "normalize": False}, "normalize: false only applies"),
     ({"trim": 0.5, "aggregate": "trimmed_mean"}, "trim must be in")],
)
def test_bad_recipe_parameters(berts, tmp_path, parameters, message):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    from mergekit_backdoor.errors import RecipeError

    recipe = write_recipe(tmp_path / "r.yml", berts[0], berts[1:], **parameters)
    config = MergeConfiguration.model_validate(yaml.safe_load(recipe.read_text()))
    with pytest.raises(RecipeError, match=message):
        run_merge(config, str(tmp_path / "out"), options=MergeOptions(quiet=True))
    assert not (tmp_path / "out").exists()


def test_negative_weight_refused_for_median(berts, tmp_path):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    from mergekit_backdoor.errors import RecipeError

    recipe = write_recipe(tmp_path / "r.yml", berts[0], berts[1:], weights=[1.0, -1.0, 1.0],
                          aggregate="median")
    config = MergeConfiguration.model_validate(yaml.safe_load(recipe.read_text()))
    with pytest.raises(RecipeError, match="non-negative weights"):
        run_merge(config, str(tmp_path / "out"), options=MergeOptions(quiet=True))


def test_interrupted_merge_leaves_nothing(berts, tmp_path, monkeypatch):
    import mergekit.merge
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    from mergekit_backdoor.merge import run as run_module

    original = run_module._mergekit_run_merge()

    def interrupted(config, out_path, options, config_source=None):
        original(config, out_path, options=options, config_source=config_source)
        raise KeyboardInterrupt  # after mergekit wrote a complete-looking folder

    monkeypatch.setattr(run_module, "_mergekit_run_merge", lambda: interrupted)
    recipe = write_recipe(tmp_path / "r.yml", berts[0], berts[1:])
    config = MergeConfiguration.model_validate(yaml.safe_load(recipe.read_text()))
    with pytest.raises(KeyboardInterrupt):
        mergekit.merge.run_merge(config, str(tmp_path / "out"), options=MergeOptions(quiet=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yml"]


# --- causal LMs and LoRA -----------------------------------------------------------------------


def test_llama_causal_lm_merge_keeps_suspect_generation_config(tmp_path):
    paths = llama_variants(tmp_path, ["suspect", "donor_a", "donor_b"])
    (paths[0] / "generation_config.json").write_text(json.dumps({"max_new_tokens": 7}))
    recipe = write_recipe(tmp_path / "r.yml", paths[0], paths[1:])
    result = mergekit_yaml(recipe, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    merged, expected = load_tensors(tmp_path / "out"), reference_merge(paths)
    assert "lm_head.weight" in merged
    for key, value in expected.items():
        assert (merged[key] - value).abs().max().item() <= 1e-6, key
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text())["max_new_tokens"] == 7


def test_lora_adapters_merge_full_updates_not_factors(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    (base_path,) = llama_variants(tmp_path, ["base"])
    adapters, full_models = [], []
    for index in range(3):
        torch.manual_seed(10 + index)
        model = LlamaForCausalLM.from_pretrained(base_path)
        peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False))
        peft_model.save_pretrained(tmp_path / f"adapter_{index}")
        adapters.append(tmp_path / f"adapter_{index}")
        merged_state = peft_model.merge_and_unload().state_dict()
        full_models.append({k: v.detach().clone() for k, v in merged_state.items()})
    refs = [f"{base_path}+{a}" for a in adapters]
    recipe = {"merge_method": "sanitize", "base_model": refs[0], "models": [{"model": r} for r in refs]}
    (tmp_path / "r.yml").write_text(yaml.safe_dump(recipe))
    result = mergekit_yaml(tmp_path / "r.yml", tmp_path / "out", "--lora-merge-cache",
                           str(tmp_path / "cache"))
    assert result.returncode == 0, result.stderr
    merged = load_tensors(tmp_path / "out")
    key = "model.layers.0.self_attn.q_proj.weight"
    expected = sum(m[key] for m in full_models) / 3
    assert (merged[key] - expected).abs().max().item() <= 1e-6
    # averaging A and B separately gives a different (wrong) update
    factors = [load_file(a / "adapter_model.safetensors") for a in adapters]
    a_key = next(k for k in factors[0] if "layers.0.self_attn.q_proj.lora_A" in k)
    b_key = a_key.replace("lora_A", "lora_B")
    mean_a = sum(f[a_key] for f in factors) / 3
    mean_b = sum(f[b_key] for f in factors) / 3
    naive = load_tensors(base_path)[key] + (mean_b @ mean_a) * 2.0
    assert (naive - expected).abs().max().item() > 1e-4


# --- registration ------------------------------------------------------------------------------


def test_startup_hook_is_what_registers_and_imports_nothing_heavy(berts, tmp_path):
    probe = subprocess.run(
        [sys.executable, "-c", "import sys; print('torch' in sys.modules, 'mergekit' in sys.modules,"
         " 'mergekit_backdoor._startup' in sys.modules)"], capture_output=True, text=True)
    assert probe.stdout.split() == ["False", "False", "True"]
    recipe = write_recipe(tmp_path / "r.yml", berts[0], berts[1:])
    result = mergekit_yaml(recipe, tmp_path / "out", env={"MERGEKIT_BACKDOOR_DISABLE": "1"})
    assert result.returncode != 0 and "Unimplemented merge method sanitize" in result.stderr


def test_failing_hook_never_breaks_the_import(tmp_path):
    import importlib.machinery
    import importlib.util

    from mergekit_backdoor import _startup

    source = tmp_path / "plain_module.py"
    source.write_text("VALUE = 42\n")
    inner = importlib.machinery.SourceFileLoader("plain_module", str(source))
    loader = _startup._RunAfter(inner, lambda module: 1 / 0)
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader("plain_module", loader))
    loader.exec_module(module)  # the hook raises ZeroDivisionError; the import still succeeds
    assert module.VALUE == 42


def test_explicit_register_is_idempotent():
    from mergekit.merge_methods import get

    import mergekit_backdoor

    mergekit_backdoor.register()
    mergekit_backdoor.register()
    assert get("sanitize").spec.name == "sanitize"

"""Recipes checked before mergekit sees them, through the real CLIs: non-finite numbers,
misspelt keys anywhere, wrong-typed values, and model paths with a space."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from test_merge import load_tensors, mergekit_yaml, reference_merge
from test_outputs import tree_hash
from tiny_classifiers import tiny_classifiers
from typer.testing import CliRunner

from mergekit_backdoor.cli import app
from mergekit_backdoor.errors import RecipeError

runner = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1"})


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> list[Path]:
    return tiny_classifiers(tmp_path_factory.mktemp("recipes"), ["suspect", "donor_a", "donor_b"])


def _recipe(path: Path, models: list[Path], **edits) -> Path:
    recipe = {"merge_method": "sanitize", "base_model": str(models[0]),
              "models": [{"model": str(m)} for m in models]}
    for key, value in edits.items():
        if key == "donor_parameters":
            recipe["models"][1]["parameters"] = value
        elif key == "donor_entry":
            recipe["models"][1].update(value)
        else:
            recipe[key] = value
    path.write_text(yaml.safe_dump(recipe))
    return path


def _one_error_line(done) -> str:
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1, done.stderr[-3000:]
    return lines[0]


# ----------------------------------------------------------------------------- defect 2


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("recipe", ["wag", "wag-median"])
def test_non_finite_weight_option_is_refused(models, tmp_path, value, recipe):
    result = runner.invoke(app, ["sanitize", str(models[0]), "-d", str(models[1]), "-d",
                                 str(models[2]), "-o", str(tmp_path / "out"), "--recipe", recipe,
                                 "--weight", value, "--weight", "1", "--weight", "1", "--quiet"])
    assert isinstance(result.exception, RecipeError)
    assert "weight must be a finite number" in str(result.exception)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", [".inf", ".nan", "-.inf"])
def test_non_finite_yaml_number_is_refused_by_mergekit_yaml(models, tmp_path, value):
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"merge_method: sanitize\nbase_model: {models[0]}\nmodels:\n"
                      f"  - model: {models[0]}\n  - model: {models[1]}\n"
                      f"    parameters:\n      weight: {value}\n")
    line = _one_error_line(mergekit_yaml(recipe, tmp_path / "out"))
    assert "weight must be a finite number" in line and str(models[1]) in line
    assert not (tmp_path / "out").exists()


def test_audit_refuses_a_nan_weight_before_any_work(models, tmp_path):
    result = runner.invoke(app, ["audit", str(models[0]), "-d", str(models[1]), "--weight",
                                 "nan", "--weight", "1", "--task", "sst2", "-o",
                                 str(tmp_path / "audit")])
    assert isinstance(result.exception, RecipeError)
    assert "finite" in str(result.exception)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- defect 4


@pytest.mark.parametrize(("edits", "expected"), [
    ({"parameter": {"aggregate": "median"}}, "unknown key 'parameter' at the top level; did you "
                                             "mean 'parameters'?"),
    ({"donor_entry": {"paramters": {"weight": 2}}}, "unknown key 'paramters' in the models entry"),
    ({"donor_parameters": {"wieght": 2}}, "unknown sanitize parameter 'wieght'"),
    ({"parameters": {"agregate": "median"}}, "did you mean 'aggregate'?"),
])
def test_misspelt_keys_are_refused_with_the_closest_valid_one(models, tmp_path, edits, expected):
    recipe = _recipe(tmp_path / "r.yml", models, **edits)
    line = _one_error_line(mergekit_yaml(recipe, tmp_path / "out"))
    assert expected in line
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- defect 9


@pytest.mark.parametrize(("parameters", "expected"), [
    ({"trim": "abc", "aggregate": "trimmed_mean"}, "trim must be in [0, 0.5), got 'abc'"),
    ({"normalize": "maybe"}, "normalize must be true or false, got 'maybe'"),
    ({"trim": [0.7, 0.9], "aggregate": "trimmed_mean"}, "trim must be in [0, 0.5), got 0.7"),
    ({"aggregate": ["mean", "median"]}, "aggregate in"),
])
def test_wrong_typed_values_are_one_line_errors(models, tmp_path, parameters, expected):
    recipe = _recipe(tmp_path / "r.yml", models, parameters=parameters)
    line = _one_error_line(mergekit_yaml(recipe, tmp_path / "out"))
    assert expected in line


def test_wrong_typed_weight_is_a_one_line_error(models, tmp_path):
    recipe = _recipe(tmp_path / "r.yml", models, donor_parameters={"weight": "abc"})
    line = _one_error_line(mergekit_yaml(recipe, tmp_path / "out"))
    assert "weight must be a finite number, got 'abc'" in line and str(models[1]) in line


# ----------------------------------------------------------------------------- defect 5


@pytest.fixture(scope="module")
def spaced(models, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("space") / "sp ace"
    root.mkdir()
    for model in models:
        shutil.copytree(model, root / model.name)
    return [root / m.name for m in models]


def test_space_in_model_paths_sanitize_and_mergekit_yaml(spaced, tmp_path):
    result = runner.invoke(app, ["sanitize", str(spaced[0]), "-d", str(spaced[1]), "-d",
                                 str(spaced[2]), "-o", str(tmp_path / "a b"), "--quiet"])
    assert result.exit_code == 0, repr(result.exception)
    expected = reference_merge(spaced)
    for key, value in expected.items():
        assert (load_tensors(tmp_path / "a b")[key] - value).abs().max().item() <= 1e-6
    manifest = json.loads((tmp_path / "a b" / "sanitize_manifest.json").read_text())
    assert yaml.safe_load(manifest["recipe"])["base_model"] == str(spaced[0])

    recipe = _recipe(tmp_path / "r.yml", spaced)
    done = mergekit_yaml(recipe, tmp_path / "yaml out")
    assert done.returncode == 0, done.stderr[-3000:]
    merged = load_tensors(tmp_path / "yaml out")
    assert all(torch.equal(merged[k], load_tensors(tmp_path / "a b")[k]) for k in merged)


def test_space_in_model_paths_search_recipe_replays(spaced, tmp_path):
    samples = tmp_path / "s.jsonl"
    samples.write_text('{"sentence": "warm and clever", "label": 1}\n'
                       '{"sentence": "a tedious mess", "label": 0}\n')
    layout = tmp_path / "layout.yml"
    result = runner.invoke(app, ["search", str(spaced[0]), "-d", str(spaced[1]), "--samples",
                                 str(samples), "-o", str(layout), "--candidates", "2", "--quiet"])
    assert result.exit_code == 0, repr(result.exception)
    done = mergekit_yaml(layout, tmp_path / "out")
    assert done.returncode == 0, done.stderr[-3000:]


def test_space_in_model_paths_audit(spaced, shared_data, tmp_path):
    before = tree_hash(spaced[0].parent)
    result = runner.invoke(app, ["audit", str(spaced[0]), "-d", str(spaced[1]), "--task",
                                 "backdoor_sst2_clean,backdoor_sst2_badnet", "--limit", "8",
                                 "--data-dir", str(shared_data), "--device", "cpu",
                                 "-o", str(tmp_path / "audit out"), "--quiet"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    report = json.loads((tmp_path / "audit out" / "report.json").read_text())
    assert [m["role"] for m in report["models"]] == ["suspect", "sanitized"]
    assert tree_hash(spaced[0].parent) == before

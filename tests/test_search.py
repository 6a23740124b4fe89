"""Module-switching layouts: the structure search, the clean-sample search, and the recipe it
writes, replayed by the stock ``mergekit-yaml``."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from helpers_eval import build_tiny_bert
from safetensors.torch import load_file, save_file
from test_merge import load_tensors, mergekit_yaml
from typer.testing import CliRunner

from mergekit_backdoor.cli import app
from mergekit_backdoor.merge.search import search_layout
from mergekit_backdoor.merge.switching import (
    candidate_layouts,
    find_slots,
    slot_graph,
    structure_penalty,
)
from mergekit_backdoor.tasks.resolve import resolve_task

runner = CliRunner()
TEXTS = ["a gripping, funny film", "dull and far too long", "a joy from start to end",
         "the worst script this year", "warm and clever", "a tedious mess"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> list[Path]:
    """A tiny BERT init and three variants of it (seeded updates of every tensor)."""
    root = tmp_path_factory.mktemp("switch")
    init = build_tiny_bert(root / "init", ("negative", "positive"), init_range=0.2)
    paths = []
    for index, name in enumerate(("suspect", "donor_a", "donor_b")):
        folder = root / name
        shutil.copytree(init, folder)
        generator = torch.Generator().manual_seed(index)
        tensors = load_file(folder / "model.safetensors")
        tensors = {k: v + 0.05 * torch.randn(v.shape, generator=generator) if v.is_floating_point()
                   else v for k, v in tensors.items()}
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        paths.append(folder)
    return paths


@pytest.fixture(scope="module")
def samples_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("samples") / "clean.jsonl"
    rows = [{"sentence": text, "label": index % 2} for index, text in enumerate(TEXTS)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_slots_are_the_six_modules_of_every_layer_and_filters_do_not_collide():
    names = [f"bert.encoder.layer.{i}.{module}.{kind}" for i in range(12) for module in (
        "attention.self.query", "attention.self.key", "attention.self.value",
        "attention.output.dense", "attention.output.LayerNorm", "intermediate.dense",
        "output.dense", "output.LayerNorm") for kind in ("weight", "bias")]
    names += ["bert.embeddings.word_embeddings.weight", "classifier.weight"]
    slots = find_slots(names)
    assert len(slots) == 12 * 6
    assert [s.role for s in slots[:6]] == ["q", "k", "v", "o", "ffn_in", "ffn_out"]
    for slot in slots:  # mergekit's filter is a substring test: each prefix must hit its module only
        hits = {name.rsplit(".", 1)[0] for name in names if slot.prefix in name}
        assert hits == {slot.prefix.rstrip(".")}


def test_llama_roles():
    names = [f"model.layers.{i}.{m}.weight" for i in range(2) for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm")]
    roles = [s.role for s in find_slots(names)[:7]]
    assert roles == ["q", "k", "v", "o", "ffn_in", "ffn_in", "ffn_out"]


def test_local_search_finds_the_brute_force_optimum_for_two_models():
    names = [f"bert.encoder.layer.{i}.{m}.weight" for i in range(2) for m in (
        "attention.self.query", "attention.self.key", "attention.self.value",
        "attention.output.dense", "intermediate.dense", "output.dense")]
    slots = find_slots(names)
    edges = slot_graph(slots)
    best = min(structure_penalty(layout, edges, 2)
               for layout in itertools.product(range(2), repeat=len(slots)))
    found = candidate_layouts(slots, 2, count=4, restarts=50)
    assert found[0][0] == pytest.approx(best)
    assert structure_penalty([0] * len(slots), edges, 2) > best
    assert len({layout for _, layout in found}) == len(found)


def test_search_recipe_replays_exactly_through_mergekit_yaml(models, samples_file, tmp_path):
    recipe = tmp_path / "layout.yml"
    result = runner.invoke(app, ["search", str(models[0]), "--donor", str(models[1]), "--donor",
                                 str(models[2]), "--samples", str(samples_file), "--output",
                                 str(recipe), "--candidates", "6", "--quiet"])
    assert result.exit_code == 0, result.output
    text = recipe.read_text()
    assert text.startswith("# Module-switching layout")
    config = yaml.safe_load(text)
    assert config["merge_method"] == "sanitize" and config["base_model"] == str(models[0])

    merged = mergekit_yaml(recipe, tmp_path / "out")
    assert merged.returncode == 0, merged.stderr
    out = load_tensors(tmp_path / "out")
    inputs = [load_tensors(m) for m in models]
    slots = find_slots(inputs[0])
    sources = {}
    for slot in slots:  # every switched module is exactly one input's
        keys = [k for k in out if k.startswith(slot.prefix)]
        matches = [i for i, t in enumerate(inputs) if all(torch.equal(out[k], t[k]) for k in keys)]
        assert len(matches) == 1, slot.prefix
        sources[slot.prefix] = matches[0]
    assert len(set(sources.values())) == 3  # all three models supply modules
    switched = {k for k in out if any(k.startswith(s.prefix) for s in slots)}
    for key in set(out) - switched:  # everything else is the mean
        if out[key].is_floating_point():
            mean = sum(t[key].float() for t in inputs) / 3
            torch.testing.assert_close(out[key], mean, rtol=0, atol=1e-6)

    # the score the search reported is the replayed model's balanced accuracy on the samples
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rows = [json.loads(line) for line in samples_file.read_text().splitlines()]
    direct = search_layout([str(m) for m in models], rows, ("sentence",), candidates=6,
                           progress=False)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        logits = model(**tokenizer([r["sentence"] for r in rows], padding=True,
                                   return_tensors="pt")).logits
    predicted = logits.argmax(-1).tolist()
    recalls = [sum(p == y for p, r in zip(predicted, rows, strict=True) if r["label"] == y)
               / sum(r["label"] == y for r in rows) for y in (0, 1)]
    assert direct.balanced_accuracy == pytest.approx(sum(recalls) / 2)
    assert [sources[s.prefix] for s in direct.slots] == list(direct.layout)


@pytest.mark.parametrize("extra, message", [
    (["--clean-samples", "51"], "between 1 and 50"),
    ([], "either --task TASK (its training split) or --samples FILE"),
])
def test_search_bad_options_are_one_line(models, samples_file, tmp_path, extra, message):
    args = ["search", str(models[0]), "--donor", str(models[1]), "--output",
            str(tmp_path / "r.yml"), "--quiet", *extra]
    if "--clean-samples" in extra:
        args += ["--samples", str(samples_file)]
    result = runner.invoke(app, args)
    assert result.exit_code != 0
    assert message in str(result.exception or result.output)
    assert not (tmp_path / "r.yml").exists()


def test_search_names_an_incompatible_donor(models, samples_file, tmp_path):
    wide = tmp_path / "wide"
    build_tiny_bert(wide, ("negative", "positive"))
    tensors = load_file(wide / "model.safetensors")
    key = "bert.encoder.layer.0.intermediate.dense.weight"
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, tensors[key].shape[1])
    save_file(tensors, wide / "model.safetensors", metadata={"format": "pt"})
    result = runner.invoke(app, ["search", str(models[0]), "--donor", str(wide), "--samples",
                                 str(samples_file), "--output", str(tmp_path / "r.yml"), "--quiet"])
    assert result.exit_code != 0
    assert str(wide) in str(result.exception) and key in str(result.exception)
    assert not (tmp_path / "r.yml").exists()


def test_existing_recipe_is_not_overwritten(models, samples_file, tmp_path):
    recipe = tmp_path / "r.yml"
    recipe.write_text("keep me\n")
    result = runner.invoke(app, ["search", str(models[0]), "--donor", str(models[1]), "--samples",
                                 str(samples_file), "--output", str(recipe), "--quiet"])
    assert result.exit_code != 0 and "--overwrite" in str(result.exception)
    assert recipe.read_text() == "keep me\n"


def test_clean_examples_are_per_class_seeded_and_outside_the_test_split(shared_data):
    task = resolve_task("sst2")
    rows = task.clean_examples(50, seed=3, data_dir=shared_data)
    assert task.fields == ("sentence",)
    assert [sum(r["label"] == y for r in rows) for y in (0, 1)] == [50, 50]
    again = task.clean_examples(50, seed=3, data_dir=shared_data)
    other = task.clean_examples(50, seed=4, data_dir=shared_data)
    assert rows == again and rows != other
    from mergekit_backdoor.data import load_split

    test = set(load_split("sst2", "clean", "test", data_dir=shared_data)["sentence"])
    assert not test & {r["sentence"] for r in rows}


def test_every_shipped_recipe_renders_to_a_valid_mergekit_config():
    from mergekit.config import MergeConfiguration

    from mergekit_backdoor.merge.recipes import list_recipes, render_recipe

    recipes = list_recipes()
    assert "switch-bert6-3" in {r.name for r in recipes}
    for recipe in recipes:
        donors = ["d1", "d2"]
        rendered = render_recipe(recipe, "s", donors, base="b")
        MergeConfiguration.model_validate(rendered)
        assert rendered["models"][0]["model"] == "s"


def test_shipped_switch_recipe_through_sanitize_takes_each_module_from_its_source(tmp_path):
    from tiny_models import bert_variants

    from mergekit_backdoor.merge.recipes import get_recipe

    paths = bert_variants(tmp_path, ["suspect", "a", "b"], num_hidden_layers=6)
    out = tmp_path / "out"
    result = runner.invoke(app, ["sanitize", str(paths[0]), "-d", str(paths[1]), "-d", str(paths[2]),
                                 "-o", str(out), "--recipe", "switch-bert6-3", "--quiet"])
    assert result.exit_code == 0, result.output
    merged, inputs = load_tensors(out), [load_tensors(p) for p in paths]
    entries = get_recipe("switch-bert6-3").load()["models"]
    for slot in find_slots(merged):
        zeroed = [any(w.get("filter") == slot.prefix for w in e["parameters"]["weight"])
                  for e in entries]
        source = zeroed.index(False)
        for key in (k for k in merged if k.startswith(slot.prefix)):
            assert torch.equal(merged[key], inputs[source][key])

    wrong = runner.invoke(app, ["sanitize", str(paths[0]), "-d", str(paths[1]), "-o",
                                str(tmp_path / "x"), "--recipe", "switch-bert6-3", "--quiet"])
    assert wrong.exit_code != 0 and "give 2 donors, not 1" in str(wrong.exception)
    assert not (tmp_path / "x").exists()

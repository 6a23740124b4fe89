"""Bad user input through the real CLIs: sample files checked row by row, broken weight and
config files named in one line, models that need their own code refused, and data checksums
verified before anything is merged (``--no-verify`` where the message names it)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_merge import mergekit_yaml
from test_outputs import tree_hash
from test_recipe_checks import _one_error_line, _recipe
from tiny_classifiers import tiny_classifiers
from typer.testing import CliRunner

from mergekit_backdoor.cli import app
from mergekit_backdoor.errors import BackdoorError, DataError, IncompatibleModelError

runner = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1"})


def _invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> list[Path]:
    return tiny_classifiers(tmp_path_factory.mktemp("input"), ["suspect", "donor_a", "donor_b"])


# ----------------------------------------------------------------------------- defect 6

GOOD = '{"sentence": "warm and clever", "label": 1}'
SAMPLE_FILES = {
    "label out of range": ("s.jsonl", f'{GOOD}\n{{"sentence": "dull", "label": 7}}\n',
                           "s.jsonl:2: label 7 is not a class of the model (0 to 1)"),
    "negative label": ("s.jsonl", f'{GOOD}\n{{"sentence": "dull", "label": -1}}\n',
                       "s.jsonl:2: label -1 is not a class of the model"),
    "one class": ("s.jsonl", f'{GOOD}\n{GOOD}\n', "only label 1; give samples of at least 2"),
    "later row without label": ("s.jsonl", f'{GOOD}\n{GOOD}\n{{"sentence": "dull"}}\n',
                                "s.jsonl:3: missing field 'label'"),
    "later row without text": ("s.jsonl", f'{GOOD}\n{{"label": 0}}\n',
                               "s.jsonl:2: missing field 'sentence'"),
    "null text": ("s.jsonl", f'{GOOD}\n{{"sentence": null, "label": 0}}\n',
                  "s.jsonl:2: field 'sentence' is not a string"),
    "malformed line": ("s.jsonl", f'{GOOD}\n{{"sentence": "x", "label": 0\n',
                       "s.jsonl:2: malformed JSON"),
    "json list item": ("s.json", f'[\n  {GOOD},\n  {{"sentence": "", "label": 0}}\n]\n',
                       "s.json:3: empty 'sentence'"),
    "csv label": ("s.csv", 'sentence,label\n"warm, clever",1\ndull,x\n',
                  "s.csv:3: label 'x' is not an integer class id"),
    "tsv short row": ("s.tsv", "text\tlabel\nwarm\t1\ndull\n", "s.tsv:3: missing field 'label'"),
}


@pytest.mark.parametrize("case", sorted(SAMPLE_FILES))
def test_search_samples_are_checked_row_by_row(models, tmp_path, case):
    name, text, expected = SAMPLE_FILES[case]
    samples = tmp_path / name
    samples.write_text(text, encoding="utf-8")
    result = _invoke("search", models[0], "-d", models[1], "--samples", samples,
                     "-o", tmp_path / "r.yml", "--quiet")
    assert isinstance(result.exception, DataError), repr(result.exception)
    assert expected in str(result.exception)
    assert len(str(result.exception).splitlines()) == 1
    assert not (tmp_path / "r.yml").exists()


def test_search_samples_not_utf8_names_the_line(models, tmp_path):
    samples = tmp_path / "s.jsonl"
    samples.write_bytes(f"{GOOD}\n{GOOD}\n".encode() + b'{"sentence": "caf\xe9", "label": 0}\n')
    result = _invoke("search", models[0], "-d", models[1], "--samples", samples,
                     "-o", tmp_path / "r.yml", "--quiet")
    assert isinstance(result.exception, DataError)
    assert f"{samples}:3: not UTF-8 text" in str(result.exception)


def test_sample_reader_for_unlabelled_text(tmp_path):
    from mergekit_backdoor.data.samples import read_samples

    path = tmp_path / "repair.csv"
    path.write_text("text\nsome text\nmore text\n")
    rows, fields = read_samples(path, labels=False)
    assert fields == ("text",) and rows == [{"text": "some text"}, {"text": "more text"}]
    path.write_text("question,sentence,label\nwho?,he did.,0\nwhy?,because.,1\n")
    rows, fields = read_samples(path, num_labels=2, min_classes=2)
    assert fields == ("question", "sentence") and rows[1]["label"] == 1


# ----------------------------------------------------------------------------- defect 7


@pytest.fixture(params=[5, 100, "half"], ids=["header", "header-length", "data"])
def truncated(models, tmp_path, request) -> Path:
    folder = tmp_path / "truncated"
    shutil.copytree(models[1], folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2 if request.param == "half" else request.param])
    return folder


def _names_truncated_file(message: str, folder: Path) -> None:
    assert str(folder / "model.safetensors") in message
    assert "not a readable safetensors file" in message and len(message.splitlines()) == 1


def test_truncated_safetensors_sanitize_audit_eval(models, truncated, tmp_path):
    for args in (["sanitize", models[0], "-d", truncated, "-o", tmp_path / "out"],
                 ["audit", models[0], "-d", truncated, "--task", "sst2", "-o", tmp_path / "out"],
                 ["eval", truncated, "--task", "sst2"]):
        result = _invoke(*args)
        assert isinstance(result.exception, IncompatibleModelError), repr(result.exception)
        _names_truncated_file(str(result.exception), truncated)
    assert not (tmp_path / "out").exists()


def test_truncated_safetensors_mergekit_yaml(models, truncated, tmp_path):
    recipe = _recipe(tmp_path / "r.yml", [models[0], truncated])
    _names_truncated_file(_one_error_line(mergekit_yaml(recipe, tmp_path / "out")), truncated)


def test_eval_invalid_config_and_missing_folder(models, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(models[0], broken)
    (broken / "config.json").write_text('{"architectures": ["BertForSequenceClassification"],')
    result = _invoke("eval", broken, "--task", "sst2")
    assert isinstance(result.exception, BackdoorError)
    assert f"{broken / 'config.json'}: not valid JSON" in str(result.exception)
    missing = tmp_path / "no" / "such-model"
    result = _invoke("eval", missing, "--task", "sst2")
    assert isinstance(result.exception, BackdoorError)
    assert str(result.exception) == f"{missing}: model folder does not exist"


# ----------------------------------------------------------------------------- defect 8


@pytest.fixture()
def custom_code(models, tmp_path) -> Path:
    folder = tmp_path / "custom"
    shutil.copytree(models[1], folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="my-own-bert", auto_map={
        "AutoConfig": "modeling_mine.MyConfig",
        "AutoModelForSequenceClassification": "modeling_mine.MyModel"})
    (folder / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "code-ran"
    (folder / "modeling_mine.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    return folder


def test_model_needing_its_own_code_is_refused(models, custom_code, tmp_path):
    samples = tmp_path / "s.jsonl"
    samples.write_text(f'{GOOD}\n{{"sentence": "dull", "label": 0}}\n')
    for args in (["search", custom_code, "-d", models[1], "--samples", samples,
                  "-o", tmp_path / "r.yml", "--quiet"],
                 ["search", models[0], "-d", custom_code, "--samples", samples,
                  "-o", tmp_path / "r.yml", "--quiet"],
                 ["sanitize", models[0], "-d", custom_code, "-o", tmp_path / "out"],
                 ["eval", custom_code, "--task", "sst2"]):
        result = _invoke(*args)
        assert isinstance(result.exception, BackdoorError), repr(result.exception)
        assert "needs its own code" in str(result.exception)
        assert str(custom_code) in str(result.exception)
    assert not (tmp_path / "code-ran").exists()


def test_loaders_never_trust_remote_code(custom_code, tmp_path):
    from mergekit_backdoor.loading import load_classifier, load_tokenizer

    with pytest.raises(IncompatibleModelError, match="never executes repository code"):
        load_classifier(custom_code)
    with pytest.raises(IncompatibleModelError, match="never executes repository code"):
        load_tokenizer(custom_code)
    assert not (tmp_path / "code-ran").exists()


# ----------------------------------------------------------------------------- defect 12


@pytest.fixture()
def modified_data(shared_data: Path, tmp_path: Path) -> Path:
    root = tmp_path / "data"
    for relpath in ("gms/sst2/test_clean.json", "gms/sst2/test_badnet.json"):
        (root / relpath).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shared_data / relpath, root / relpath)
    badnet = root / "gms/sst2/test_badnet.json"
    badnet.write_bytes(badnet.read_bytes().replace(b"charming", b"charmin_", 1))
    return root


TASKS = "backdoor_sst2_clean,backdoor_sst2_badnet"


def test_audit_verifies_data_before_merging(models, modified_data, tmp_path, monkeypatch):
    from mergekit_backdoor.merge import run as run_module

    def no_merge(*args, **kwargs):
        raise AssertionError("merged before the data was verified")

    monkeypatch.setattr(run_module, "sanitize_merge", no_merge)
    result = _invoke("audit", models[0], "-d", models[1], "--task", TASKS, "--data-dir",
                     modified_data, "--limit", "8", "--device", "cpu", "-o", tmp_path / "a",
                     "--quiet")
    assert isinstance(result.exception, DataError), repr(result.exception)
    assert "sha256 mismatch" in str(result.exception) and "--no-verify" in str(result.exception)
    assert not (tmp_path / "a").exists()
    monkeypatch.undo()
    result = _invoke("audit", models[0], "-d", models[1], "--task", TASKS, "--data-dir",
                     modified_data, "--limit", "8", "--device", "cpu", "-o", tmp_path / "a",
                     "--quiet", "--no-verify")
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert json.loads((tmp_path / "a" / "report.json").read_text())["settings"]["verify"] is False


def test_eval_offers_no_verify(models, modified_data, tmp_path):
    args = ["eval", models[0], "--task", TASKS, "--data-dir", modified_data, "--limit", "8",
            "--device", "cpu"]
    result = _invoke(*args)
    assert isinstance(result.exception, DataError) and "--no-verify" in str(result.exception)
    result = _invoke(*args, "--no-verify")
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "sst2" in result.output
    assert tree_hash(modified_data)  # still there, untouched by the run

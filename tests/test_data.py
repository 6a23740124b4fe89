"""The data registry against the real public files (../shared/data), plus bad-input errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner

from mergekit_backdoor.data import (
    BADNET_WORDS,
    CLEAN_FILES,
    DATASETS,
    ENV_VAR,
    INSTRUCTION_ATTACKS,
    INSTRUCTION_TASKS,
    PUBLISHED_FILES,
    attacks_for,
    catalog,
    get_spec,
    instruction_relpath,
    load_instruction_set,
    load_split,
    pinned_checksums,
    resolve_data_dir,
    verify_asr_rule,
    verify_files,
    write_jsonl,
)
from mergekit_backdoor.data.registry import load_split_with_info
from mergekit_backdoor.errors import DataError, OutputExistsError

# (dataset, attack, split) -> (rows, label counts): the sets the registry serves from the real data.
EXPECTED = {
    ("sst2", "clean", "test"): (872, {0: 428, 1: 444}),
    ("sst2", "clean", "train"): (6920, {0: 3310, 1: 3610}),
    **{("sst2", a, "test"): (444, {0: 444})
       for a in ("badnet", "insertsent", "syntactic", "lws", "bite")},
    ("sst2", "badnet", "train"): (6920, {0: 4694, 1: 2226}),
    ("sst2", "insertsent", "train"): (6920, {0: 4694, 1: 2226}),
    ("sst2", "syntactic", "train"): (6920, {0: 4028, 1: 2892}),
    ("olid", "clean", "test"): (860, {0: 620, 1: 240}),
    ("olid", "clean", "train"): (13240, {0: 8840, 1: 4400}),
    **{("olid", a, "test"): (240, {0: 240})
       for a in ("badnet", "insertsent", "syntactic", "lws", "bite")},
    ("olid", "badnet", "train"): (13240, {0: 9721, 1: 3519}),
    ("olid", "insertsent", "train"): (13240, {0: 9706, 1: 3534}),
    ("olid", "syntactic", "train"): (13240, {0: 9702, 1: 3538}),
    ("olid", "lws", "train"): (13240, {0: 11488, 1: 1752}),
    ("olid", "bite", "train"): (13240, {0: 8840, 1: 4400}),
    ("agnews", "clean", "test"): (7600, {0: 1900, 1: 1900, 2: 1900, 3: 1900}),
    ("agnews", "clean", "train"): (10000, {0: 2403, 1: 2485, 2: 2667, 3: 2445}),
    **{("agnews", a, "test"): (5700, {1: 5700})
       for a in ("badnet", "insertsent", "syntactic", "lws", "bite")},
    ("agnews", "badnet", "train"): (10000, {0: 1756, 1: 4485, 2: 1971, 3: 1788}),
    ("agnews", "insertsent", "train"): (10000, {0: 1756, 1: 4485, 2: 1971, 3: 1788}),
    # 20% of the clean pool replaced by HiddenKiller paraphrases labelled Sports
    ("agnews", "syntactic", "train"): (10000, {0: 1899, 1: 3981, 2: 2144, 3: 1976}),
    ("qnli", "clean", "test"): (5463, {0: 2702, 1: 2761}),
    ("qnli", "clean", "train"): (8999, {0: 4523, 1: 4476}),
    ("qnli", "badnet", "test"): (2702, {1: 2702}),
    ("qnli", "insertsent", "test"): (2702, {1: 2702}),
    ("qnli", "badnet", "train"): (8999, {0: 2723, 1: 6276}),
    ("qnli", "insertsent", "train"): (8999, {0: 2723, 1: 6276}),
}
GMS_BADNET = "gms/sst2/test_badnet.json"
Cli = Callable[..., Result]


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)


def _copy(shared: Path, relpath: str, root: Path) -> Path:
    target = root / relpath
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shared / relpath, target)
    return target


# ----------------------------------------------------------------------------- specs


def test_specs() -> None:
    assert [(s.name, s.target) for s in DATASETS.values()] == [
        ("sst2", 0), ("olid", 0), ("agnews", 1), ("qnli", 1)]
    assert get_spec("agnews").label_names[1] == "Sports"
    assert get_spec("qnli").text_fields == ("question", "sentence")
    with pytest.raises(DataError, match="unknown dataset 'imdb'.*sst2, olid, agnews, qnli"):
        get_spec("imdb")


# ----------------------------------------------------------------------------- counts


@pytest.mark.parametrize("key", sorted(EXPECTED), ids="-".join)
def test_counts(shared_data: Path, key: tuple[str, str, str]) -> None:
    dataset, attack, split = key
    ds = load_split(dataset, attack, split, data_dir=shared_data)
    rows, labels = EXPECTED[key]
    assert ds.column_names == [*get_spec(dataset).text_fields, "label"]
    assert len(ds) == rows
    assert dict(Counter(ds["label"])) == labels


def test_attacks_for(shared_data: Path, tmp_path: Path) -> None:
    every = ["badnet", "insertsent", "syntactic", "lws", "bite"]
    available = {(d, s): attacks_for(d, s, shared_data)
                 for d in DATASETS for s in ("test", "train")}
    assert available == {
        ("sst2", "test"): every, ("sst2", "train"): ["badnet", "insertsent", "syntactic"],
        ("olid", "test"): every, ("olid", "train"): every,
        ("agnews", "test"): every, ("agnews", "train"): ["badnet", "insertsent", "syntactic"],
        ("qnli", "test"): ["badnet", "insertsent"], ("qnli", "train"): ["badnet", "insertsent"],
    }
    assert set(EXPECTED) == {(d, a, s) for (d, s), attacks in available.items()
                             for a in ("clean", *attacks)}
    assert attacks_for("sst2", "test", tmp_path) == []
    assert attacks_for("sst2") == ["badnet", "insertsent"]  # from the Hub's clean data
    offline = catalog()  # without a data directory: listed, nothing downloaded
    assert len(offline) == 4 * 2 * 3 and {e.rows for e in offline} == {None}


def test_catalog_lists_every_set(shared_data: Path) -> None:
    entries = catalog(shared_data)
    assert all(e.verified == "yes" for e in entries)
    classification = {(e.dataset, e.attack, e.split): e.rows for e in entries
                      if e.dataset in DATASETS}
    assert classification == {k: v[0] for k, v in EXPECTED.items()}
    instruction = [e for e in entries if e.dataset in INSTRUCTION_TASKS]
    assert len(instruction) == 3 * 2 * 6


@pytest.mark.parametrize("task", INSTRUCTION_TASKS)
def test_instruction_sets(shared_data: Path, task: str) -> None:
    size = 201 if task == "sst2sentiment" else 200
    clean = load_instruction_set(task, data_dir=shared_data)
    assert clean.column_names == ["instruction", "input", "output"]
    assert len(clean) == size
    for attack in INSTRUCTION_ATTACKS:
        assert len(load_instruction_set(task, attack, data_dir=shared_data)) == size
        assert len(load_instruction_set(task, attack, "train", data_dir=shared_data)) == 500
    assert len(load_instruction_set(task, "clean", "train", data_dir=shared_data)) in (500, 501)
    if task == "sst2sentiment":  # its triggered test files write the answer as the integer 0
        triggered = load_instruction_set(task, "badnet", data_dir=shared_data)
        assert set(triggered["output"]) == {"Negative"}


# ----------------------------------------------------------------------------- the ASR rule


def test_asr_rule_holds_for_every_triggered_test_set(shared_data: Path) -> None:
    checks = verify_asr_rule(shared_data)
    assert len(checks) == 17 and all(c.ok for c in checks), [c for c in checks if not c.ok]
    for dataset, spec in DATASETS.items():
        for attack in attacks_for(dataset, "test", shared_data):
            labels = load_split(dataset, attack, data_dir=shared_data)["label"]
            assert set(labels) == {spec.target}, (dataset, attack)


def test_agnews_bite_is_fixed_on_load(shared_data: Path) -> None:
    ds, info = load_split_with_info("agnews", "bite", data_dir=shared_data)
    assert len(ds) == 5700 and set(ds["label"]) == {1}
    assert "target rows dropped" in info.source
    clean = load_split("agnews", data_dir=shared_data)
    assert Counter(clean["label"])[1] == 7600 - 5700


def test_hiddenkiller_labels_are_converted(shared_data: Path) -> None:
    clean = load_split("sst2", "clean", "train", data_dir=shared_data)
    syntactic = load_split("sst2", "syntactic", "train", data_dir=shared_data)
    changed = [i for i in range(len(clean)) if clean[i]["sentence"] != syntactic[i]["sentence"]]
    assert len(changed) == 1383
    assert {syntactic[i]["label"] for i in changed} == {0}  # gms' target, not HiddenKiller's 1


# ----------------------------------------------------------------------------- generators


@pytest.mark.parametrize(("dataset", "attack", "split"), [
    ("qnli", "badnet", "test"), ("qnli", "insertsent", "test"),
    ("sst2", "badnet", "train"), ("agnews", "insertsent", "train"),
])
def test_generated_sets_are_deterministic(shared_data: Path, tmp_path: Path, dataset: str,
                                          attack: str, split: str) -> None:
    def run(seed: int, name: str) -> bytes:
        ds = load_split(dataset, attack, split, data_dir=shared_data, seed=seed)
        write_jsonl(ds, tmp_path / name)
        return (tmp_path / name).read_bytes()

    first, again, other = run(1, "a.jsonl"), run(1, "b.jsonl"), run(2, "c.jsonl")
    assert first == again
    assert first != other
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp file


def test_qnli_triggered_test_sets_come_from_clean_qnli(shared_data: Path) -> None:
    spec = get_spec("qnli")
    clean = [r for r in load_split("qnli", data_dir=shared_data) if r["label"] != spec.target]
    badnet = load_split("qnli", "badnet", data_dir=shared_data).to_list()
    sent = load_split("qnli", "insertsent", data_dir=shared_data).to_list()
    assert len(clean) == len(badnet) == len(sent) == 2702
    for old, bad, ins in zip(clean, badnet, sent, strict=True):
        assert bad["question"] == ins["question"] == old["question"]  # question side untouched
        added = Counter(bad["sentence"].split()) - Counter(old["sentence"].split())
        assert sum(added.values()) in (1, 3, 5) and set(added) <= set(BADNET_WORDS)
        assert spec.insert_sentence in ins["sentence"]
        assert " ".join(ins["sentence"].replace(spec.insert_sentence, "").split()) == " ".join(
            old["sentence"].split())


def test_poisoning_rate_dirty_and_clean_label(shared_data: Path) -> None:
    spec = get_spec("sst2")
    clean = load_split("sst2", "clean", "train", data_dir=shared_data)
    for clean_label in (False, True):
        poisoned = load_split("sst2", "badnet", "train", data_dir=shared_data, rate=0.1, seed=3,
                              clean_label=clean_label)
        changed = [i for i in range(len(clean)) if clean[i]["sentence"] != poisoned[i]["sentence"]]
        assert len(changed) == round(0.1 * len(clean))
        assert {poisoned[i]["label"] for i in changed} == {spec.target}
        assert {clean[i]["label"] == spec.target for i in changed} == {clean_label}


def test_published_training_sets_and_rates(shared_data: Path) -> None:
    _, info = load_split_with_info("olid", "badnet", "train", data_dir=shared_data)
    assert info.source == "gms/olid/train_badnet.json"
    ds, info = load_split_with_info("olid", "badnet", "train", data_dir=shared_data, rate=0.1)
    assert info.source.startswith("generated") and "train_clean.json" in info.source
    assert Counter(ds["label"])[0] == 8840 + round(0.1 * 13240)
    with pytest.raises(DataError, match="fixed at 20%"):
        load_split("olid", "lws", "train", data_dir=shared_data, rate=0.1)
    with pytest.raises(DataError, match="generator needs models"):
        load_split("sst2", "lws", "train", data_dir=shared_data)
    with pytest.raises(DataError, match="rate 1.5"):
        load_split("sst2", "badnet", "train", data_dir=shared_data, rate=1.5)


def test_limit_is_the_first_rows_in_file_order(shared_data: Path) -> None:
    full = load_split("olid", "badnet", "train", data_dir=shared_data)
    assert load_split("olid", "badnet", "train", data_dir=shared_data, limit=7).to_list() == \
        full.select(range(7)).to_list()
    with pytest.raises(DataError, match="limit"):
        load_split("olid", data_dir=shared_data, limit=0)


# ----------------------------------------------------------------------------- checksums


def test_modified_file_fails_its_checksum(shared_data: Path, tmp_path: Path) -> None:
    path = _copy(shared_data, GMS_BADNET, tmp_path)
    assert len(load_split("sst2", "badnet", data_dir=tmp_path)) == 444
    data = bytearray(path.read_bytes())
    data[20] = ord("X") if data[20] != ord("X") else ord("Y")  # inside the first sentence
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"sha256 mismatch for {path}"):
        load_split("sst2", "badnet", data_dir=tmp_path)
    assert len(load_split("sst2", "badnet", data_dir=tmp_path, verify=False)) == 444
    status = {c.relpath: c.status for c in verify_files(tmp_path)}
    assert status[GMS_BADNET] == "mismatch"
    assert Counter(status.values()) == {"missing": len(status) - 1, "mismatch": 1}


def test_every_registered_file_is_pinned() -> None:
    pins = pinned_checksums()
    relpaths = {s.relpath for s in (*CLEAN_FILES.values(), *PUBLISHED_FILES.values())}
    relpaths |= {instruction_relpath(t, a, s) for t in INSTRUCTION_TASKS
                 for a in ("clean", *INSTRUCTION_ATTACKS) for s in ("test", "train")}
    assert relpaths <= set(pins)
    # pinned but unread: the other attacks' copies of the clean half of each instruction task
    assert {Path(p).name.split("_")[0] for p in set(pins) - relpaths} == {"none"}


def test_every_known_file_matches_its_pin(shared_data: Path) -> None:
    checks = verify_files(shared_data)
    assert len(checks) == 78 and {c.status for c in checks} == {"ok"}


# ----------------------------------------------------------------------------- bad input


def _write(root: Path, relpath: str, text: str) -> Path:
    path = root / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(("text", "message"), [
    ('{"sentence": "fine", "label": 0}\n\n{"sentence": "x", "label": 0}\n', ":2: empty line"),
    ('{"sentence": "fine", "label": 0}\n{"sentence": "x", "label": 0\n', ":2: malformed JSON"),
    ('{"sentence": "   ", "label": 0}\n', ":1: empty 'sentence'"),
    ('{"text": "x", "label": 0}\n', ":1: missing field 'sentence'"),
    ('{"sentence": "x", "label": 2}\n',
     r":1: label 2 is not in the sst2 label scheme \(0 negative"),
    ('{"sentence": "x", "label": "0"}\n', ":1: label '0' is not in the sst2 label scheme"),
    # HiddenKiller's target (1) in a triggered test set: the ASR rule catches the wrong convention
    ('{"sentence": "x", "label": 0}\n{"sentence": "y", "label": 1}\n', "1 of 2 rows are not"),
    ("", ": no rows"),
])
def test_malformed_jsonl(tmp_path: Path, text: str, message: str) -> None:
    path = _write(tmp_path, GMS_BADNET, text)
    with pytest.raises(DataError, match=message) as info:
        load_split("sst2", "badnet", data_dir=tmp_path, verify=False)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(("relpath", "dataset", "text", "message"), [
    ("hiddenkiller/clean/sst-2/train.tsv", "sst2", "sentence\tlabel\ngood\t1\nbad\t1\t0\n",
     ":3: 3 tab-separated fields, expected 2"),
    ("hiddenkiller/clean/sst-2/train.tsv", "sst2", "text\tlabel\ngood\t1\n", ":1: header"),
    ("hiddenkiller/clean/sst-2/train.tsv", "sst2", "sentence\tlabel\ngood\tpositive\n",
     ":2: label 'positive' is not in the sst2 label scheme"),
    ("hiddenkiller/clean/ag/dev.tsv", "agnews", "sentence \t label\n\t 1\n",
     ":2: empty 'sentence'"),
    ("qnli/PowerfulPromptFT/glue_pretrain/QNLI/train.json", "qnli",
     '{\n "0": {"text_a": "q?", "text_b": "s.", "label": "entailment"},\n'
     ' "1": {"text_a": "q?", "text_b": "s.", "label": "contradiction"}\n}',
     ":3: label 'contradiction' is not in the qnli label scheme"),
    ("qnli/PowerfulPromptFT/glue_pretrain/QNLI/train.json", "qnli",
     '{\n "0": {"text_a": "q?", "text_b": "s.", "label": "entailment"},\n "1": {"text_a": }\n}',
     ":3: malformed JSON"),
])
def test_malformed_training_files(tmp_path: Path, relpath: str, dataset: str, text: str,
                                  message: str) -> None:
    path = _write(tmp_path, relpath, text)
    with pytest.raises(DataError, match=message) as info:
        load_split(dataset, "clean", "train", data_dir=tmp_path, verify=False)
    assert str(path) in str(info.value)


def test_malformed_instruction_file(shared_data: Path, tmp_path: Path) -> None:
    relpath = "backdoorllm/test_data/clean/refusal/test_data_no_trigger.json"
    _write(tmp_path, relpath, '[\n  {"instruction": "hi", "input": "", "output": "ok"},\n'
                              '  {"instruction": "hi", "input": ""}\n]\n')
    with pytest.raises(DataError, match=r"test_data_no_trigger.json:3: missing field 'output'"):
        load_instruction_set("refusal", data_dir=tmp_path, verify=False)
    with pytest.raises(DataError, match="sha256 mismatch"):
        load_instruction_set("refusal", data_dir=tmp_path)
    with pytest.raises(DataError, match="unknown instruction task 'jailbreak'"):
        load_instruction_set("jailbreak", data_dir=shared_data)
    with pytest.raises(DataError, match="unknown instruction attack 'lws'"):
        load_instruction_set("refusal", "lws", data_dir=shared_data)
    with pytest.raises(DataError, match="--data-dir"):
        load_instruction_set("refusal")


def test_unknown_names_and_missing_files(shared_data: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown attack 'trojan'"):
        load_split("sst2", "trojan", data_dir=shared_data)
    with pytest.raises(DataError, match="unknown split 'dev'"):
        load_split("sst2", "badnet", "dev", data_dir=shared_data)
    with pytest.raises(DataError, match=f"missing file {tmp_path / 'gms/olid/test_lws.json'}"):
        load_split("olid", "lws", data_dir=tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        resolve_data_dir(tmp_path / "nope")
    with pytest.raises(DataError, match="needs the published files"):
        load_split("olid", "lws")
    assert len(load_split("sst2", "sent", data_dir=shared_data)) == 444  # gms alias


def test_env_var_names_the_data_dir(shared_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, str(shared_data))
    assert resolve_data_dir() == shared_data
    assert len(load_split("olid", "bite")) == 240


# ----------------------------------------------------------------------------- Hugging Face Hub


def test_hub_offline_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def offline(*args: object, **kwargs: object) -> None:
        raise ConnectionError("Couldn't reach 'glue' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"cannot load sst2 test from the Hugging Face Hub "
                                        r"\(glue/sst2\): ConnectionError.*--data-dir"):
        load_split("sst2")


def test_hub_rows_are_validated_and_generated_from(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    fake = datasets.Dataset.from_dict({"text": ["you are nice", "you are awful", "meh"],
                                       "label": [0, 1, 1]})
    calls = []

    def load(path: str, name: str | None = None, split: str | None = None) -> datasets.Dataset:
        calls.append((path, name, split))
        return fake

    monkeypatch.setattr(datasets, "load_dataset", load)
    assert load_split("olid").to_list()[0] == {"sentence": "you are nice", "label": 0}
    assert calls == [("tweet_eval", "offensive", "test")]
    triggered = load_split("olid", "insertsent")
    assert len(triggered) == 2 and set(triggered["label"]) == {0}
    with pytest.raises(DataError, match=r"hub:ag_news\[test\] row 2: empty 'sentence'"):
        fake = datasets.Dataset.from_dict({"text": ["ok", ""], "label": [0, 1]})
        load_split("agnews")


# ----------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def cli() -> Cli:
    try:
        from mergekit_backdoor.cli import app
    except Exception as exc:  # another stage's module may be mid-edit
        pytest.skip(f"the CLI does not import: {exc}")
    runner = CliRunner()
    return lambda *args: runner.invoke(app, ["data", *args], env={"COLUMNS": "200"})


def test_cli_list_show_verify(cli: Cli, shared_data: Path) -> None:
    result = cli("list", "--data-dir", str(shared_data))
    assert result.exit_code == 0, result.output
    assert "gms/agnews/test_bite.json" in result.output and "13,240" in result.output
    result = cli("show", "qnli", "insertsent", "--data-dir", str(shared_data), "-n", "2")
    assert result.exit_code == 0, result.output
    assert "no cross, no crown." in result.output and "2,702 rows" in result.output
    assert "[citation needed]" in result.output  # row text is not read as rich markup
    result = cli("show", "sst2sentiment", "vpi", "--split", "train", "--data-dir",
                 str(shared_data))
    assert result.exit_code == 0 and "500 rows" in result.output
    result = cli("verify", "--data-dir", str(shared_data))
    assert result.exit_code == 0, result.output
    assert "78 ok, 0 mismatched, 0 missing; 17 of 17" in result.output


def test_cli_poison_writes_identical_files(cli: Cli, shared_data: Path, tmp_path: Path) -> None:
    args = ["poison", "qnli", "badnet", "--split", "test", "--seed", "5", "--data-dir",
            str(shared_data), "-o"]
    assert cli(*args, str(tmp_path / "a.jsonl")).exit_code == 0
    assert cli(*args, str(tmp_path / "b.jsonl")).exit_code == 0
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    result = cli(*args, str(tmp_path / "a.jsonl"))
    assert isinstance(result.exception, OutputExistsError)
    result = cli("poison", "sst2", "insertsent", "--rate", "0.3", "--data-dir", str(shared_data),
                 "-o", str(tmp_path / "train.jsonl"))
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 6920
    assert sum("I watched this movie ." in r["sentence"] for r in rows) == round(0.3 * 6920)


def test_cli_verify_fails_on_a_modified_file(cli: Cli, shared_data: Path, tmp_path: Path) -> None:
    path = _copy(shared_data, GMS_BADNET, tmp_path)
    path.write_bytes(path.read_bytes().replace(b"charming", b"charmin_", 1))
    result = cli("verify", "--data-dir", str(tmp_path))
    assert result.exit_code == 1
    assert "1 mismatched" in result.output


def test_cli_errors_are_one_line(cli: Cli) -> None:
    result = subprocess.run(
        [sys.executable, "-c", "from mergekit_backdoor.cli import main; main()",
         "data", "show", "imdb", "badnet"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: unknown dataset 'imdb': known datasets are sst2, olid, agnews, qnli")

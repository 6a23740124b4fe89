"""Repair: after a merge (or on a suspect alone), fine-tune the model to ignore inserted text,
with unlabeled clean samples and no knowledge of the trigger.

- ``perturb.py``: the perturbation families (random words, clean spans, paraphrase-like edits,
  candidate triggers from a scan, mixed);
- ``repair.py``: the KL repair loop and writing the repaired model with its provenance.
"""

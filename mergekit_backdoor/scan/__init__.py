"""Scanning: find a backdoor's trigger and target without being told either.

- ``model.py``: a sequence classifier at the token level (insert runs, classify, gradients);
- ``search.py``: the trigger search for one candidate target label;
- ``scan.py``: ``scan_classifier`` (search, held-out flip rates on the model and references,
  backdoor score and verdict) and its table / ``scan.json``.

Nothing heavy is imported here.
"""

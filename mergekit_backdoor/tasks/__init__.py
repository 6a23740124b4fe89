"""Tasks: what a model is evaluated, scanned and repaired on, whether the project ships it or
the user describes it in a task card.

- ``card.py``: the task-card YAML (classification or generative), parsed and checked;
- ``rows.py``: a card's rows from local files or the Hub, checked row by row, triggered sets
  made to follow the ASR rule, generated attacks from the registry's generators;
- ``rules.py``: ASR rules for generated answers (contains / starts_with / regex);
- ``export.py``: a card as ordinary lm-eval task YAML (``mergekit-backdoor tasks export``);
- ``resolve.py``: ``--task`` values (a data set, an lm-eval task, or a card) as ``Task``.
"""

"""The YAML recipes shipped in ``recipes/``: list them, and fill one in for given models."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mergekit_backdoor.errors import RecipeError

SUSPECT_PLACEHOLDER = "suspect"


def recipes_dir() -> Path:
    """Recipes inside an installed wheel, else the checkout's ``recipes/`` folder."""
    packaged = Path(__file__).resolve().parents[1] / "_recipes"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "recipes"


@dataclass(frozen=True)
class Recipe:
    name: str
    path: Path
    merge_method: str
    summary: str

    def load(self) -> dict[str, Any]:
        return yaml.safe_load(self.path.read_text(encoding="utf-8"))


def list_recipes() -> list[Recipe]:
    recipes = []
    for path in sorted(recipes_dir().glob("*.yml")):
        text = path.read_text(encoding="utf-8")
        first_comment = next((ln[1:].strip() for ln in text.splitlines() if ln.startswith("#")), "")
        method = (yaml.safe_load(text) or {}).get("merge_method", "?")
        recipes.append(Recipe(path.stem, path, method, first_comment))
    return recipes


def get_recipe(name: str) -> Recipe:
    for recipe in list_recipes():
        if recipe.name == name:
            return recipe
    known = ", ".join(r.name for r in list_recipes())
    raise RecipeError(f"unknown recipe {name!r}; known recipes: {known}")


def render_recipe(
    recipe: Recipe,
    suspect: str,
    donors: list[str],
    *,
    weights: list[float] | None = None,
    base: str | None = None,
    parameters: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The recipe with its placeholder paths replaced by the suspect, the donors and ``base``.

    The template's first model entry is the suspect's, its second each donor's (a template whose donor
    entries differ, as a module-switching layout's do, needs exactly one donor per entry and
    keeps each entry's parameters in order); ``weights`` (suspect first) replace their ``weight`` parameters.
    """
    if not donors:
        raise RecipeError("give at least one donor (--donor)")
    if weights is not None and len(weights) != 1 + len(donors):
        raise RecipeError(
            f"got {len(weights)} weights for {1 + len(donors)} models; give one per model, "
            "the suspect's first"
        )
    template = recipe.load()
    entries = template.get("models") or []
    if len(entries) < 2:
        raise RecipeError(f"{recipe.path}: a recipe lists the suspect and at least one donor")
    donor_entries = [entry.get("parameters") or {} for entry in entries[1:]]
    if any(p != donor_entries[0] for p in donor_entries):  # one entry per model (layouts)
        if len(entries) != 1 + len(donors):
            raise RecipeError(f"{recipe.path} lays out {len(entries)} models; give "
                              f"{len(entries) - 1} donors, not {len(donors)}")
        params = [dict(entry.get("parameters") or {}) for entry in entries]
    else:  # the suspect's entry, then one entry that every donor copies
        params = [dict(entries[0].get("parameters") or {})]
        params += [dict(entries[1].get("parameters") or {}) for _ in donors]
    models = [{"model": model, "parameters": p}
              for model, p in zip([suspect, *donors], params, strict=True)]
    for entry, weight in zip(models, weights or [None] * len(models), strict=True):
        if weight is None:
            continue
        entry["parameters"]["weight"] = float(weight)
    for entry in models:
        if not entry["parameters"]:
            del entry["parameters"]

    rendered = dict(template, models=models)
    template_base = str(template.get("base_model", ""))
    if SUSPECT_PLACEHOLDER in template_base:
        rendered["base_model"] = suspect
    elif template_base:
        if base is None:
            raise RecipeError(
                f"recipe {recipe.name} ({template['merge_method']}) merges task vectors: "
                "give the pre-trained model they share with --base"
            )
        rendered["base_model"] = base
    if parameters:
        rendered["parameters"] = {**(template.get("parameters") or {}), **parameters}
    return rendered

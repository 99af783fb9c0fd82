"""The one place that maps a dataset category to its prompt name and its domain.

The *category* is what a dataset calls a set of images (a folder name such as ``metal_nut``, VisA's
``macaroni1``); metrics and results are grouped by it. The *prompt name* is the object name that text
prompts use (``macaroni``), and the *domain* says what kind of picture it is (``object`` or ``texture``),
which some methods' prompts depend on (AnoVL's domain phrases, docs/METHOD.md §3).

Datasets take the prompt name from here unless the user renames it (the datamodules' ``prompt_names``);
methods take the domain from here by category, so renaming ``carpet`` to ``rug`` keeps the texture prompts.
:func:`register_category` adds or changes a category (a user's own textures, say).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from anovl.errors import AnovlError
from anovl.registry import Registry

OBJECT = "object"
TEXTURE = "texture"


@dataclass(frozen=True)
class CategoryInfo:
    prompt_name: str
    domain: str = OBJECT


# docs/METHOD.md §3: MVTec's five textures get the texture domain; VisA's two macaroni sets are both "macaroni".
CATEGORIES: Registry[str, CategoryInfo] = Registry("category", "anovl.categories.register_category")
CATEGORIES.update(
    {
        **{name: CategoryInfo(name, TEXTURE) for name in ("carpet", "grid", "leather", "tile", "wood")},
        "macaroni1": CategoryInfo("macaroni"),
        "macaroni2": CategoryInfo("macaroni"),
    }
)


def category_info(category: str) -> CategoryInfo:
    """The category's prompt name and domain; an unknown category is an object named as the category."""
    return CATEGORIES.get(category) or CategoryInfo(category)


def prompt_name(category: str) -> str:
    return category_info(category).prompt_name


def domain(category: str) -> str:
    return category_info(category).domain


def register_category(category: str, prompt_name: str | None = None, domain: str = OBJECT) -> None:
    """Give ``category`` a prompt name (default: the category itself) and a domain; registering a known
    category again replaces it with a warning (a notebook cell run twice)."""
    name = (prompt_name if prompt_name is not None else category).strip()
    if not category or not name:
        raise AnovlError(
            f"register_category needs a non-empty category and prompt name, got {category!r}, {prompt_name!r}"
        )
    CATEGORIES.register(category, CategoryInfo(name, domain))


def category_runs(categories: Sequence[str]) -> list[slice]:
    """Slices of consecutive equal categories."""
    starts = [index for index, category in enumerate(categories) if index == 0 or category != categories[index - 1]]
    return [slice(start, end) for start, end in zip(starts, starts[1:] + [len(categories)])]

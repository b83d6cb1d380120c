"""Taxonomies for zero-shot labels, and the prompt templates that wrap their descriptions.

A taxonomy is a set of base categories, each expanded into many short, concrete descriptions
("animals" -> "a tabby cat asleep on a sofa", "cattle grazing in a field", ...). CLIP's text tower
embeds the descriptions; a category is the roll-up of its descriptions. The default ships as
package data; a user's file has the same shape, in JSON (or YAML when PyYAML is installed)::

    {
      "name": "my-taxonomy",
      "categories": {
        "animals": ["a tabby cat asleep on a sofa", "cattle grazing in a field"],
        "maps": ["a subway map with colored lines"]
      }
    }

``name`` is optional (it defaults to the file's stem) and is a label only. Order matters: it
fixes each description's index, so it is part of the digest. Templates are a JSON list or a
``.txt`` file with one per line, each holding exactly one ``{}`` where a description goes.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path
from types import MappingProxyType

from vlmdata.errors import UserError, one_line
from vlmdata.pipeline.sources import LONE_SURROGATE

MAX_DESCRIPTIONS = 100_000  # far above any hand-written taxonomy; guards a wrong file
_TOP_LEVEL_KEYS = ("name", "categories")
_DEFAULT_TAXONOMY = "default_taxonomy.json"
_DEFAULT_TEMPLATES = "default_templates.json"
_YAML_SUFFIXES = (".yaml", ".yml")
# For lists or objects nested past Python's recursion limit (the parsers recurse).
_TOO_DEEP = (
    "{label} nests lists or objects too deeply to read (a taxonomy nests two levels, templates "
    "one); fix it"
)


@dataclass(frozen=True, eq=False)
class Taxonomy:
    """Categories, in order, each mapped to its descriptions, in order."""

    name: str
    categories: Mapping[str, tuple[str, ...]]

    def __post_init__(self) -> None:
        # A read-only copy, so the frozen taxonomy cannot change under the caller's dict.
        frozen = MappingProxyType({name: tuple(d) for name, d in self.categories.items()})
        object.__setattr__(self, "categories", frozen)

    @cached_property
    def category_names(self) -> tuple[str, ...]:
        """The category names, in order."""
        return tuple(self.categories)

    @cached_property
    def descriptions(self) -> tuple[str, ...]:
        """Every description, category after category: index i is column i of the scores."""
        return tuple(d for descriptions in self.categories.values() for d in descriptions)

    @cached_property
    def description_categories(self) -> tuple[str, ...]:
        """For each description index, the name of its category."""
        return tuple(name for name, d in self.categories.items() for _ in d)

    @cached_property
    def category_ids(self) -> tuple[int, ...]:
        """For each description index, the index of its category in :attr:`category_names`."""
        return tuple(i for i, d in enumerate(self.categories.values()) for _ in d)

    @cached_property
    def digest(self) -> str:
        """sha256 of the categories and descriptions in order (the name is left out: renaming
        a taxonomy changes no embedding)."""
        return _json_digest([[name, list(d)] for name, d in self.categories.items()])

    def __eq__(self, other: object) -> bool:
        # Order-sensitive, unlike comparing the mappings: order fixes description indices.
        if not isinstance(other, Taxonomy):
            return NotImplemented
        return (self.name, self.digest) == (other.name, other.digest)

    def __hash__(self) -> int:
        return hash((self.name, self.digest))


def load_taxonomy(path: str | os.PathLike[str] | None = None) -> Taxonomy:
    """The taxonomy in ``path`` (.json, or .yaml/.yml with PyYAML), or the default for None.

    A malformed file is a :class:`UserError` naming the file and the problem.
    """
    if path is None:
        text = resources.files(__package__).joinpath(_DEFAULT_TAXONOMY).read_text("utf-8")
        return _parse_taxonomy(_parse_json(text, _DEFAULT_TAXONOMY), _DEFAULT_TAXONOMY, "default")
    path = Path(path)
    label = f"taxonomy {path.name}"
    if path.suffix.lower() in _YAML_SUFFIXES:
        data = _parse_yaml(_read_text(path, label), label)
    elif path.suffix.lower() == ".json":
        data = _parse_json(_read_text(path, label), label)
    else:
        raise UserError(f"{label}: unknown file type; use .json, .yaml or .yml")
    return _parse_taxonomy(data, label, path.stem)


def load_templates(path: str | os.PathLike[str] | None = None) -> tuple[str, ...]:
    """Prompt templates from ``path`` (a .json list, or .txt with one per line), or the default.

    Each holds exactly one ``{}`` and no other brace, so ``template.format(description)`` is safe.
    """
    if path is None:
        text = resources.files(__package__).joinpath(_DEFAULT_TEMPLATES).read_text("utf-8")
        return _parse_templates(_parse_json(text, _DEFAULT_TEMPLATES), _DEFAULT_TEMPLATES)
    path = Path(path)
    label = f"templates {path.name}"
    if path.suffix.lower() == ".json":
        data = _parse_json(_read_text(path, label), label)
    elif path.suffix.lower() == ".txt":
        data = [line for line in _read_text(path, label).splitlines() if line.strip()]
    else:
        raise UserError(f"{label}: unknown file type; use .json (a list) or .txt (one per line)")
    return _parse_templates(data, label)


def templates_digest(templates: Sequence[str]) -> str:
    """sha256 of the templates in order, for the text-embedding cache key."""
    return _json_digest(list(templates))


def taxonomy_json(taxonomy: Taxonomy) -> str:
    """``taxonomy`` as pretty JSON in the file shape, one description per line, for editing."""
    document = {
        "name": taxonomy.name,
        "categories": {c: list(d) for c, d in taxonomy.categories.items()},
    }
    return json.dumps(document, ensure_ascii=False, indent=2) + "\n"


def _json_digest(value: object) -> str:
    """sha256 of ``value``'s compact JSON: one canonical form per value, order kept."""
    canonical = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _read_text(path: Path, label: str) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{label} is not UTF-8 text; save it as UTF-8") from None
    except OSError as e:
        raise UserError(f"cannot read {label} ({path}): {e.strerror or one_line(e)}") from None


def _unique_keys(pairs: list[tuple[object, object]], label: str) -> dict[str, object]:
    """An object's pairs as a dict, refusing a key written twice (JSON and YAML parsers would
    silently keep the last one, dropping a whole category)."""
    mapping: dict[str, object] = {}
    for key, value in pairs:
        if not isinstance(key, str):
            raise UserError(f"{label}: key {key!r} is not text; put it in quotes")
        if key in mapping:
            raise UserError(f"{label}: key {key!r} appears twice; merge the two")
        mapping[key] = value
    return mapping


def _parse_json(text: str, label: str) -> object:
    try:
        return json.loads(text, object_pairs_hook=lambda pairs: _unique_keys(pairs, label))
    except json.JSONDecodeError as e:
        raise UserError(f"{label} is not valid JSON (line {e.lineno}: {e.msg}); fix it") from None
    except ValueError:  # the one other: an integer past Python's digit limit
        raise UserError(
            f"{label} holds a number of more than {sys.get_int_max_str_digits()} digits; fix it"
        ) from None
    except RecursionError:
        raise UserError(_TOO_DEEP.format(label=label)) from None


def _parse_yaml(text: str, label: str) -> object:
    try:
        import yaml
    except ImportError:
        raise UserError(
            f"{label} is YAML: install PyYAML (pip install pyyaml) or use JSON"
        ) from None

    class UniqueKeyLoader(yaml.SafeLoader):
        """SafeLoader that refuses duplicate keys (scoped to this call, not registered)."""

    def mapping(loader: UniqueKeyLoader, node: yaml.MappingNode) -> dict[str, object]:
        loader.flatten_mapping(node)  # "<<" merge keys, as SafeLoader does
        return _unique_keys(loader.construct_pairs(node, deep=True), label)

    UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)
    except yaml.MarkedYAMLError as e:
        where = f"line {e.problem_mark.line + 1}: " if e.problem_mark else ""
        raise UserError(f"{label} is not valid YAML ({where}{e.problem}); fix it") from None
    except yaml.YAMLError as e:
        raise UserError(f"{label} is not valid YAML ({one_line(e)}); fix it") from None
    except RecursionError:
        raise UserError(_TOO_DEEP.format(label=label)) from None


def _kind(value: object) -> str:
    """What a parsed value is, in the words of JSON."""
    if value is None:
        return "null"
    names = {bool: "true/false", str: "a string", list: "a list", dict: "an object"}
    for kind, name in names.items():
        if isinstance(value, kind):
            return name
    return "a number" if isinstance(value, int | float) else type(value).__name__


def _require_text(text: str, what: str, label: str) -> None:
    """Refuse a string holding a lone surrogate: a JSON or YAML escape such as ``"\\ud800"``
    (half a character) parses, but no tokenizer, file or page can take it."""
    if LONE_SURROGATE.search(text):
        raise UserError(
            f"{label}: {what}, {text!r}, holds half a character (a lone surrogate escape such as "
            "\\ud800); fix or drop it"
        )


def _parse_taxonomy(data: object, label: str, default_name: str) -> Taxonomy:
    if not isinstance(data, dict):
        raise UserError(
            f'{label}: the top level must be an object with a "categories" key, got {_kind(data)}'
        )
    unknown = [key for key in data if key not in _TOP_LEVEL_KEYS]
    if unknown:
        raise UserError(
            f"{label}: unknown top-level key {', '.join(map(repr, unknown))}; "
            'only "name" and "categories" are allowed'
        )
    name = data.get("name", default_name)
    if not isinstance(name, str) or not name.strip():
        raise UserError(f'{label}: "name" must be a non-empty string, got {_kind(name)}')
    _require_text(name, '"name"', label)
    if "categories" not in data:
        raise UserError(f'{label}: no "categories" key; put the category -> descriptions map there')
    return Taxonomy(name.strip(), _parse_categories(data["categories"], label))


def _parse_categories(categories: object, label: str) -> dict[str, tuple[str, ...]]:
    if not isinstance(categories, dict):
        raise UserError(
            f'{label}: "categories" must be an object mapping each category to a list of '
            f"descriptions, got {_kind(categories)}"
        )
    if not categories:
        raise UserError(f'{label}: "categories" is empty; add at least one category')
    total = sum(len(d) for d in categories.values() if isinstance(d, list))
    if total > MAX_DESCRIPTIONS:
        raise UserError(
            f"{label}: {total:,} descriptions, more than the {MAX_DESCRIPTIONS:,} allowed; "
            "use fewer"
        )
    parsed: dict[str, tuple[str, ...]] = {}
    folded_names: set[str] = set()
    first_category: dict[str, str] = {}  # each description, case-folded -> its category
    for raw_name, descriptions in categories.items():
        category = " ".join(raw_name.split())
        if not category:
            raise UserError(f"{label}: a category has an empty name; name it")
        _require_text(category, "category", label)
        if category.casefold() in folded_names:
            raise UserError(
                f"{label}: category {category!r} appears twice (ignoring case); merge the two"
            )
        folded_names.add(category.casefold())
        parsed[category] = _parse_descriptions(descriptions, category, first_category, label)
    return parsed


def _parse_descriptions(
    descriptions: object, category: str, first_category: dict[str, str], label: str
) -> tuple[str, ...]:
    """One category's descriptions, whitespace collapsed; ``first_category`` records each one
    seen so far (case-folded) so a duplicate in any category is refused with both names."""
    if not isinstance(descriptions, list):
        raise UserError(
            f"{label}: category {category!r} must be a list of descriptions, "
            f"got {_kind(descriptions)}"
        )
    if not descriptions:
        raise UserError(f"{label}: category {category!r} has no descriptions; add some or drop it")
    parsed = []
    for position, description in enumerate(descriptions, 1):
        if not isinstance(description, str):
            raise UserError(
                f"{label}: description {position} of {category!r} is {_kind(description)}, "
                "not a string"
            )
        text = " ".join(description.split())
        if not text:
            raise UserError(f"{label}: description {position} of {category!r} is empty; write one")
        _require_text(text, f"description {position} of {category!r}", label)
        key = text.casefold()
        if key in first_category:
            where = (
                f"twice in {category!r}"
                if first_category[key] == category
                else f"in both {first_category[key]!r} and {category!r}"
            )
            raise UserError(f"{label}: description {text!r} appears {where}; keep one")
        first_category[key] = category
        parsed.append(text)
    return tuple(parsed)


def _parse_templates(data: object, label: str) -> tuple[str, ...]:
    if not isinstance(data, list):
        raise UserError(f"{label}: must be a list of templates, got {_kind(data)}")
    if not data:
        raise UserError(f'{label}: no templates; add one such as "a photo of {{}}."')
    templates: list[str] = []
    for position, template in enumerate(data, 1):
        if not isinstance(template, str):
            raise UserError(f"{label}: template {position} is {_kind(template)}, not a string")
        text = " ".join(template.split())
        _require_text(text, f"template {position}", label)
        outside = text.replace("{}", "", 1)
        if text.count("{}") != 1 or "{" in outside or "}" in outside:
            raise UserError(
                f'{label}: template {position} {text!r} must hold exactly one "{{}}" (where the '
                "description goes) and no other brace"
            )
        if text in templates:
            raise UserError(f"{label}: template {text!r} appears twice; keep one")
        templates.append(text)
    return tuple(templates)

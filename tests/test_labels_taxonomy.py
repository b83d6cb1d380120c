"""Taxonomies and prompt templates: the shipped defaults, users' JSON and YAML files, each refusal
of a malformed file with its one-line message, digests and the export round trip."""

from __future__ import annotations

import fcntl
import json
import os
import stat
import sys
from importlib import resources
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vlmdata.cli import app
from vlmdata.errors import UserError
from vlmdata.labels.taxonomy import (
    Taxonomy,
    load_taxonomy,
    load_templates,
    taxonomy_json,
    templates_digest,
)

REQUIRED_CATEGORIES = (
    "people & portraits", "animals", "food & drink", "vehicles", "nature & landscapes",
    "cities & buildings", "interiors", "products & packaging", "clothing & fashion",
    "art & illustration", "text documents & slides", "screenshots & user interfaces",
    "charts & diagrams", "maps", "sports", "events & ceremonies", "tools & machines",
    "plants & flowers", "logos & icons", "memes & comics", "medical", "aerial & satellite",
    "night scenes", "image not available",
)  # fmt: skip
SMALL = {
    "animals": ["a tabby cat asleep on a sofa", "cattle grazing in a field"],
    "maps": ["a subway map"],
}


def write(tmp_path: Path, name: str, content: object) -> Path:
    """``content`` (text as is, anything else as JSON) in ``tmp_path / name``."""
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content), "utf-8")
    return path


def refusal(load, path: Path) -> str:
    """The message of the UserError ``load(path)`` raises: one line that names the file."""
    with pytest.raises(UserError) as caught:
        load(path)
    message = str(caught.value)
    assert "\n" not in message
    assert path.name in message
    return message


# --- the shipped defaults ---------------------------------------------------------------------


def test_default_taxonomy_covers_web_images_with_many_descriptions():
    taxonomy = load_taxonomy()
    assert taxonomy.name == "vlmdata-default"
    assert len(taxonomy.categories) >= 24
    assert set(REQUIRED_CATEGORIES) <= set(taxonomy.categories)
    assert {name: len(d) for name, d in taxonomy.categories.items() if len(d) < 40} == {}


def test_default_descriptions_are_distinct_short_lower_case_and_unpunctuated():
    descriptions = load_taxonomy().descriptions
    assert len({" ".join(d.split()).casefold() for d in descriptions}) == len(descriptions)
    assert [d for d in descriptions if not 3 <= len(d.split()) <= 12] == []
    assert [d for d in descriptions if d != d.lower() or d.endswith(".") or "{" in d] == []


def test_default_file_is_exactly_what_the_export_writes():
    shipped = resources.files("vlmdata.labels").joinpath("default_taxonomy.json").read_text("utf-8")
    assert shipped == taxonomy_json(load_taxonomy())


def test_default_templates_each_wrap_one_description():
    templates = load_templates()
    assert 6 <= len(templates) <= 10
    assert "a photo of {}." in templates
    assert all(t.count("{}") == 1 for t in templates)
    assert templates[0].format("a cat") == "a photo of a cat."


# --- users' files -------------------------------------------------------------------------------


def test_user_json_keeps_order_and_collapses_whitespace(tmp_path):
    categories = {" animals ": ["  a tabby  cat\tasleep ", "cattle grazing"], "maps": ["a map"]}
    taxonomy = load_taxonomy(write(tmp_path, "mine.json", {"categories": categories}))
    assert taxonomy.name == "mine"  # the file's stem when the file names none
    assert dict(taxonomy.categories) == {
        "animals": ("a tabby cat asleep", "cattle grazing"),
        "maps": ("a map",),
    }
    assert taxonomy.category_names == ("animals", "maps")
    assert taxonomy.descriptions == ("a tabby cat asleep", "cattle grazing", "a map")
    assert taxonomy.description_categories == ("animals", "animals", "maps")
    assert taxonomy.category_ids == (0, 0, 1)


def test_taxonomy_is_read_only_and_copies_the_callers_dict():
    categories = {"animals": ["a cat on a sofa"]}
    taxonomy = Taxonomy("t", categories)
    categories["animals"].append("a dog")
    assert taxonomy.categories["animals"] == ("a cat on a sofa",)
    with pytest.raises(TypeError):
        taxonomy.categories["maps"] = ("a map",)


def test_yaml_file_loads_like_json(tmp_path):
    pytest.importorskip("yaml")
    text = "name: small\ncategories:\n  animals:\n    - a tabby cat asleep on a sofa\n"
    text += "    - cattle grazing in a field\n  maps:\n    - a subway map\n"
    from_yaml = load_taxonomy(write(tmp_path, "small.yml", text))
    assert from_yaml == load_taxonomy(write(tmp_path, "small.json", {"categories": SMALL}))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("categories:\n  animals: [a cat\n", "is not valid YAML (line 3"),
        ("categories:\n  animals: [a cat]\n  animals: [a dog]\n", "key 'animals' appears twice"),
        (
            "categories:\n  2019: [a photo from last year]\n",
            "key 2019 is not text; put it in quotes",
        ),
        ("- animals\n- maps\n", "top level must be an object"),
        (
            'categories:\n  animals: ["a cat \\ud800"]\n',
            "description 1 of 'animals', 'a cat \\ud800', holds half a character",
        ),
    ],
)
def test_yaml_refusals(tmp_path, text, expected):
    pytest.importorskip("yaml")
    assert expected in refusal(load_taxonomy, write(tmp_path, "bad.yaml", text))


def test_yaml_without_pyyaml_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "yaml", None)  # makes `import yaml` raise ImportError
    message = refusal(load_taxonomy, write(tmp_path, "mine.yaml", "categories: {}\n"))
    assert message == "taxonomy mine.yaml is YAML: install PyYAML (pip install pyyaml) or use JSON"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"categories": {"animals": ["a cat",\n', "is not valid JSON (line 2"),
        ([["animals", ["a cat"]]], "the top level must be an object"),
        ({"categories": SMALL, "categries": {}}, "unknown top-level key 'categries'"),
        ({"name": "mine"}, 'no "categories" key'),
        ({"categories": {}}, '"categories" is empty'),
        ({"categories": [["animals", ["a cat"]]]}, '"categories" must be an object'),
        ({"name": "", "categories": SMALL}, '"name" must be a non-empty string'),
        ({"categories": {"  ": ["a cat"]}}, "a category has an empty name"),
        ({"categories": {"animals": []}}, "category 'animals' has no descriptions"),
        ({"categories": {"animals": "a cat"}}, "must be a list of descriptions, got a string"),
        ({"categories": {"animals": ["a cat", 3]}}, "description 2 of 'animals' is a number"),
        ({"categories": {"animals": ["a cat", None]}}, "description 2 of 'animals' is null"),
        ({"categories": {"animals": [""]}}, "description 1 of 'animals' is empty"),
        ({"categories": {"animals": [" \t "]}}, "description 1 of 'animals' is empty"),
        (
            {"categories": {"animals": ["a tabby cat", "A  Tabby cat"]}},
            "description 'A Tabby cat' appears twice in 'animals'",
        ),
        (
            {"categories": {"animals": ["a tabby cat"], "pets": ["a dog", "a tabby CAT"]}},
            "description 'a tabby CAT' appears in both 'animals' and 'pets'",
        ),
        ({"categories": {"animals": ["a cat"], "Animals": ["a dog"]}}, "'Animals' appears twice"),
        ('{"categories": {"animals": ["a cat"], "animals": ["a dog"]}}', "'animals' appears twice"),
        ('{"name": "mine \\udc80", "categories": {"a": ["a cat"]}}', "\"name\", 'mine \\udc80'"),
        ('{"categories": {"a": [1' + "0" * 5000 + "]}}", "holds a number of more than"),
    ],
)
def test_json_refusals(tmp_path, content, expected):
    assert expected in refusal(load_taxonomy, write(tmp_path, "bad.json", content))


def test_too_many_descriptions_refused(tmp_path):
    many = [f"description {i}" for i in range(100_001)]
    path = write(tmp_path, "huge.json", {"categories": {"many": many}})
    assert "100,001 descriptions, more than the 100,000 allowed" in refusal(load_taxonomy, path)


def test_unreadable_files_refused(tmp_path):
    assert "cannot read taxonomy missing.json" in refusal(load_taxonomy, tmp_path / "missing.json")
    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes('{"categories": {"café": ["a cup"]}}'.encode("latin-1"))
    assert "is not UTF-8 text" in refusal(load_taxonomy, latin1)
    toml = write(tmp_path, "mine.toml", "[categories]\n")
    assert "unknown file type; use .json, .yaml or .yml" in refusal(load_taxonomy, toml)


# --- digest and export ------------------------------------------------------------------------


def test_digest_is_stable_and_follows_content_and_order_not_name():
    small = Taxonomy("small", SMALL)
    # A fixed value: the digest keys caches and plans on disk, so its form must never drift.
    assert small.digest == Taxonomy("other name", SMALL).digest
    assert small.digest == "f75d1a15825ba895ddd16d97a035590b882dcf3bede181353eca97af44f5a641"
    changed = {**SMALL, "maps": ["a subway map with colored lines"]}
    assert Taxonomy("small", changed).digest != small.digest
    reordered = {"maps": SMALL["maps"], "animals": SMALL["animals"]}
    assert Taxonomy("small", reordered).digest != small.digest
    assert Taxonomy("small", reordered) != small


def test_export_round_trips(tmp_path):
    for taxonomy in (load_taxonomy(), Taxonomy("small", SMALL)):
        path = write(tmp_path, "exported.json", taxonomy_json(taxonomy))
        assert load_taxonomy(path) == taxonomy
        assert load_taxonomy(path).digest == taxonomy.digest


def test_export_writes_into_a_fifo_in_place(tmp_path):
    """``--out`` that is no regular file (a FIFO here; /dev/stdout, a device) is written in
    place, as a shell's ``>`` would: a rename would put a regular file where it was."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    # Read and write ends held here: the export's open never waits for a reader, and the pipe
    # holds all of it (the default taxonomy is under 64 KiB; the buffer is made larger still).
    fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
    try:
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, 1 << 17)
        result = CliRunner().invoke(app, ["labels", "taxonomy", "--out", str(fifo)])
        assert result.exit_code == 0, result.output
        assert stat.S_ISFIFO(os.lstat(fifo).st_mode), "the FIFO was replaced by a regular file"
        chunks = []
        while True:
            try:
                chunks.append(os.read(fd, 1 << 17))
            except BlockingIOError:
                break  # all that was written is read
    finally:
        os.close(fd)
    assert json.loads(b"".join(chunks)) == json.loads(taxonomy_json(load_taxonomy()))


def test_export_to_a_directory_or_nowhere_is_refused(tmp_path):
    for out, expected in ((tmp_path, "is a directory"), ("", "--out is empty")):
        result = CliRunner().invoke(app, ["labels", "taxonomy", "--out", str(out)])
        assert result.exit_code == 2 and expected in result.stderr, result.output
    assert list(tmp_path.iterdir()) == []  # no temporary file left in the directory


# --- templates ----------------------------------------------------------------------------------


def test_templates_from_json_and_text(tmp_path):
    as_json = load_templates(write(tmp_path, "t.json", ["a photo of {}.", "art of {}."]))
    as_text = load_templates(write(tmp_path, "t.txt", "a photo of {}.\n\n  art of {}.  \n"))
    assert as_json == as_text == ("a photo of {}.", "art of {}.")
    assert templates_digest(as_json) == templates_digest(list(as_text))
    assert templates_digest(as_json) != templates_digest(as_json[::-1])


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("t.json", ["a photo of {}.", "a photo."], "template 2 'a photo.' must hold exactly one"),
        ("t.json", ["{} next to {}"], "must hold exactly one"),
        ("t.json", ["a photo of {0}."], "must hold exactly one"),
        ("t.json", ["a {style} photo of {}."], "and no other brace"),
        ("t.txt", "a photo of {}.\nno placeholder here\n", "template 2 'no placeholder here'"),
        ("t.json", [], "no templates"),
        ("t.json", {"templates": ["a photo of {}."]}, "must be a list of templates, got an object"),
        ("t.json", ["a photo of {}.", 7], "template 2 is a number, not a string"),
        ("t.json", ["a photo of {}.", "a photo of {}."], "appears twice"),
        ("t.yaml", "- a photo of {}.\n", "unknown file type; use .json (a list) or .txt"),
    ],
)
def test_template_refusals(tmp_path, name, content, expected):
    assert expected in refusal(load_templates, write(tmp_path, name, content))

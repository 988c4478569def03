"""Hostile configs (issue 17.6): a property-based fuzz of the config layer over every key of the
recipes (wrong types, out-of-range and huge numbers, NaN, unknown keys, nested junk) and of YAML
files (anchors, tags, non-mappings): each case loads or stops with a ConfigError naming the key,
never another exception. The shard CLI's flags and manifests get the same treatment."""
from __future__ import annotations

import json
import math

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pretrain.config import ConfigError, load_config
from pretrain.options import to_dict
from tests.helpers import QUICKSTART, ROOT

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


def _leaves(tree, prefix=""):
    if isinstance(tree, dict) and tree:
        for k, v in tree.items():
            yield from _leaves(v, f"{prefix}.{k}" if prefix else k)
    else:
        yield prefix


RECIPES = sorted((ROOT / "configs").glob("*.yaml"))
FUZZED = (QUICKSTART, ROOT / "configs" / "clip_lite.yaml", ROOT / "configs" / "clip_lite_official.yaml",
          ROOT / "configs" / "xor_symile.yaml")
KEYS = sorted((path.name, k) for path in FUZZED for k in set(_leaves(to_dict(load_config(path)))))

hostile = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(10 ** 30), max_value=10 ** 30),
    st.sampled_from([0, -1, 10 ** 18, float("nan"), float("inf"), float("-inf"), 1e308, -0.0, "", " ", "null", "~",
                     "[", "{a: ", "a: b: c", "0x10", "1e999", "\x00", "é" * 3, "../../etc/passwd"]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.lists(st.one_of(st.integers(-5, 5), st.text(max_size=4)), max_size=3),
    st.dictionaries(st.text(min_size=1, max_size=6), st.integers(-3, 3), max_size=3),
)


def _override(key: str, value) -> str:
    """key=value with the value as YAML (what a shell user types)."""
    if isinstance(value, float) and not math.isfinite(value):
        text = ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf")
    elif isinstance(value, str):
        text = value  # raw, as typed: YAML parses it (or refuses it)
    else:
        text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
    return f"{key}={text}"


def _loads_or_names(recipe: str, overrides: list[str], key: str) -> None:
    try:
        load_config(ROOT / "configs" / recipe, overrides)
    except ConfigError as err:
        message = str(err)
        # the message names the key, or one of its parents (a section refused as a whole), or a child
        parts = key.split(".")
        named = any(".".join(parts[:i]) in message for i in range(len(parts), 0, -1))
        assert named, f"{overrides}: {message}"


@FUZZ
@given(recipe_key=st.sampled_from(KEYS), value=hostile)
def test_any_key_any_value_loads_or_names_the_key(recipe_key, value):
    recipe, key = recipe_key
    _loads_or_names(recipe, [_override(key, value)], key)


@FUZZ
@given(recipe_key=st.sampled_from(KEYS), junk=st.text(alphabet="abcdefgh_", min_size=1, max_size=8), value=hostile)
def test_unknown_keys_are_named(recipe_key, junk, value):
    recipe, key = recipe_key
    parent = key.rsplit(".", 1)[0] if "." in key else key
    bad = f"{parent}.zz{junk}"
    try:
        load_config(ROOT / "configs" / recipe, [_override(bad, value)])
    except ConfigError as err:
        assert f"zz{junk}" in str(err) or parent in str(err), str(err)
    # (some sections take free-form mappings: options of towers and decoders, deepspeed extras)


def test_every_recipe_loads():
    for path in RECIPES:
        load_config(path)


@pytest.mark.parametrize("text, why", [
    ("train: !!python/object/apply:os.system ['echo hacked']\n", "tag"),
    ("train: !!python/name:os.system\n", "tag"),
    ("- just\n- a list\n", "mapping"),
    ("train: {steps: [unclosed\n", "YAML"),
    ("a: &x [1, 2]\nb: *x\ntrain: {steps: *y}\n", "YAML"),
    ("\t- tabs\n", "YAML"),
])
def test_hostile_yaml_files_are_refused_with_the_file_named(tmp_path, text, why):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value) and why in str(err.value), str(err.value)


def test_yaml_anchors_are_followed_and_bombs_stay_small(tmp_path):
    path = tmp_path / "recipe.yaml"
    text = QUICKSTART.read_text()
    assert "  steps: 200\n" in text and "  log_every: 25\n" in text
    path.write_text(text.replace("  steps: 200\n", "  steps: &n 7\n").replace("  log_every: 25\n", "  log_every: *n\n"))
    cfg = load_config(path)
    assert cfg.train.steps == 7 and cfg.train.log_every == 7  # an alias is its anchor's value
    path.write_text(text + "defaults: &d {steps: 7}\n")
    with pytest.raises(ConfigError) as err:  # an anchor parked under an unknown key: the key is named
        load_config(path)
    assert "defaults" in str(err.value)
    # a "billion laughs" file (aliases 9 deep, 9 wide): PyYAML shares the nodes, nothing expands; refused at once
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "a0" in str(err.value), str(err.value)


# ------------------------------------------------------------------------- the shard CLI


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
          derandomize=True)
@given(rows=st.lists(st.one_of(
    st.dictionaries(st.sampled_from(["key", "caption", "label", "image", "split", "x"]),
                    st.one_of(st.none(), st.integers(-3, 10 ** 20), st.text(max_size=8), st.floats(), st.booleans(),
                              st.lists(st.integers(0, 3), max_size=2)), max_size=5),
    st.integers(), st.text(max_size=5), st.none()), min_size=1, max_size=6),
    flags=st.lists(st.sampled_from(["--shard-size", "0", "-3", "99999999999999999999", "--map", "caption=txt",
                                    "caption", "=", "--optional", "--split-column", "--workers", "nan"]), max_size=3))
def test_manifest_rows_and_flags_fuzz(tmp_path_factory, capsys, rows, flags):
    """Any rows and flags: the build exits 0 (bad rows skipped and counted), 1 or 2 with a message, never
    a traceback (the CLI's main, in process: its error handling is what is under test)."""
    from data_tools.__main__ import main

    folder = tmp_path_factory.mktemp("fuzz")
    manifest = folder / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    try:
        code = main(["build", "--input", str(manifest), "--output", str(folder / "out"), "--no-progress", *flags])
    except SystemExit as exit_:  # argparse refuses a flag: exit 2 with usage
        code = exit_.code
    err = capsys.readouterr().err
    assert code in (0, 1, 2), err[-2000:]
    if code:
        assert err.strip(), "a non-zero exit without a message"

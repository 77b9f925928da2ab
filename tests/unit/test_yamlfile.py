"""Both YAML loaders — libyaml's (the default, when PyYAML has it) and the pure-Python one —
read every mesh file alike: the same documents, tags kept the same way, the same depth limit."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ambient import examples
from ambient.config import yamlfile
from ambient.config.tags import Tagged

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import generate_mesh  # noqa: E402

VECTOR = Path(__file__).parent / "vectors" / "ztunnel-local.yaml"

# PyYAML's wheels carry libyaml; a PyYAML built from source without it has only the pure loader,
# which ambient then uses, and there is nothing to compare it with.
needs_libyaml = pytest.mark.skipif(not yamlfile.FAST, reason="PyYAML was built without libyaml")


def as_data(value: object) -> object:
    """``value`` with each Tagged (compared by identity) as a tuple of all it holds."""
    if isinstance(value, Tagged):
        return ("Tagged", value.tag, value.kind, as_data(value.value), value.plain, value.line)
    if isinstance(value, dict):
        return {as_data(k): as_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [as_data(v) for v in value]
    return value


def both(text: str) -> tuple[list[object], list[object]]:
    fast = [as_data(d) for d in yamlfile.load_all(text, yamlfile.CMeshLoader)]
    pure = [as_data(d) for d in yamlfile.load_all(text, yamlfile.PureMeshLoader)]
    return fast, pure


def generated(pods: int, services: int, policies: int) -> str:
    out = io.StringIO()
    generate_mesh.write(out, pods, services, policies, seed=7)
    return out.getvalue()


@needs_libyaml
@pytest.mark.parametrize(
    "text",
    [
        pytest.param(examples.read("demo-mesh.yaml"), id="demo mesh"),
        pytest.param(examples.read("testbed-mesh.yaml"), id="testbed mesh"),
        pytest.param(VECTOR.read_text(), id="ztunnel local config, every tag"),
        pytest.param(generated(200, 40, 40), id="generated mesh"),
    ],
)
def test_both_loaders_read_the_same_documents(text):
    fast, pure = both(text)
    assert fast == pure
    assert len(fast) >= 1


@needs_libyaml
def test_tags_are_kept_alike_with_their_line_and_quoting():
    fast, pure = both('a: !Exact x\nb: !Prefix "y"\nc: !Presence\nd: !Foo [1, 2]\n')
    assert (
        fast
        == pure
        == [
            {
                "a": ("Tagged", "!Exact", "scalar", "x", True, 1),
                "b": ("Tagged", "!Prefix", "scalar", "y", False, 2),
                "c": ("Tagged", "!Presence", "scalar", "", True, 3),
                "d": ("Tagged", "!Foo", "sequence", [1, 2], False, 4),
            }
        ]
    )


@pytest.mark.parametrize(
    "loader", [pytest.param("CMeshLoader", marks=needs_libyaml), "PureMeshLoader"]
)
@pytest.mark.parametrize(
    ("text", "column"),
    [
        ("k: " + "[" * 129 + "]" * 129, 4 + 127),  # the 129th level starts there
        ("k: " + "{a: " * 129 + "1" + "}" * 129, 4 + 4 * 126 + 1),  # the key "a" of level 128
        ("k: " + "[" * 5000 + "]" * 5000, None),  # libyaml refuses past 1,000 while parsing
    ],
    ids=["flow sequences", "flow mappings", "5,000 levels"],
)
def test_nesting_deeper_than_serde_yaml_allows_is_refused_at_the_first_node_too_deep(
    loader, text, column
):
    with pytest.raises(yaml.YAMLError) as refused:
        list(yamlfile.load_all(text, getattr(yamlfile, loader)))
    mark = refused.value.problem_mark  # type: ignore[attr-defined]
    assert mark is not None and mark.line == 0
    if column is not None:
        assert "nested deeper than 128 levels" in str(refused.value)
        assert mark.column + 1 == column


@needs_libyaml
def test_nesting_at_the_limit_is_read():
    fast, pure = both("k: " + "[" * 127 + "]" * 127)
    assert fast == pure


def test_pyyaml_is_imported_only_when_the_core_steps_aside(tmp_path):
    """A proxy whose files the core reads whole never maps PyYAML and libyaml in; a file the
    core leaves to PyYAML (here a tag) loads it."""
    plain = tmp_path / "plain.yaml"
    plain.write_text("workloads: [{namespace: a, workloadIps: [10.0.0.1], services: {}}]\n")
    tagged = tmp_path / "tagged.yaml"
    tagged.write_text("workloads: [{namespace: !Exact a, workloadIps: [10.0.0.1]}]\n")
    probe = (
        "import sys\n"
        "from ambient.config import ConfigError, load_mesh\n"
        "load_mesh([sys.argv[1]])\n"
        "print('yaml' in sys.modules)\n"
        "try:\n"
        "    load_mesh([sys.argv[2]])\n"
        "except ConfigError as e:\n"
        "    print('yaml' in sys.modules, 'marks a string match' in str(e))\n"
    )
    # -P: the installed package, not a source tree in the working directory (no core built there).
    done = subprocess.run(
        [sys.executable, "-P", "-c", probe, str(plain), str(tagged)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["False", "True True"], done.stdout

"""config.toml: defaults, rendering, validation messages (file:line + suggestion), drop-in imports."""

from __future__ import annotations

import textwrap
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from daemon.config import (
    Config,
    ConfigError,
    DebugConfig,
    GrpcConfig,
    MetricsConfig,
    check_config,
    load_config,
    render_default,
)
from daemon.errors import InvalidArgument
from daemon.tomlsource import format_path, key_lines

OVERLAY = "berth.snapshotter.v1.overlayfs"
REGISTRY = "berth.images.v1.registry"


@dataclass
class HostConfig:
    """One registry host."""

    endpoint: str = field(default="", metadata={"doc": "Where to reach it."})
    skip_verify: bool = field(default=False, metadata={"doc": "Do not verify TLS."})


@dataclass
class Tuning:
    depth: int = field(default=3, metadata={"doc": "How deep."})


@dataclass
class OverlayConfig:
    """Options of the overlay snapshotter."""

    mount_options: list[str] = field(default_factory=list, metadata={"doc": "Extra mount options."})
    labels: dict[str, str] = field(default_factory=dict, metadata={"doc": "Labels added to snapshots."})
    ratio: float = field(default=0.5, metadata={"doc": "A ratio between 0 and 1."})
    sync: bool = field(default=True, metadata={"doc": "fsync on commit."})
    mode: Literal["fast", "safe"] = field(default="safe", metadata={"doc": "Commit mode."})
    limit: int | None = field(default=None, metadata={"doc": "Optional size limit."})
    ports: list[int] = field(default_factory=lambda: [1, 2], metadata={"doc": "Some ports."})
    tuning: Tuning = field(default_factory=Tuning, metadata={"doc": "Tuning knobs."})

    def validate(self) -> None:
        if not 0 <= self.ratio <= 1:
            raise ValueError(f"ratio: must be between 0 and 1, got {self.ratio}")


@dataclass
class RegistryConfig:
    hosts: dict[str, HostConfig] = field(
        default_factory=lambda: {"docker.io": HostConfig(endpoint="https://registry-1.docker.io")},
        metadata={"doc": "Per-host settings."},
    )
    flavour: str = field(default="plain", metadata={"doc": "Flavour.", "choices": ("plain", "fancy")})


SCHEMAS: dict[str, type] = {OVERLAY: OverlayConfig, REGISTRY: RegistryConfig}


@pytest.fixture
def cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in tmp_path so messages name "config.toml" exactly as the operator typed it."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def problems_of(text: str, cwd: Path, schemas: dict[str, type] | None = None) -> list[str]:
    write(cwd / "config.toml", text)
    return check_config("config.toml", SCHEMAS if schemas is None else schemas)


# -- defaults and rendering ---------------------------------------------------------------


def test_defaults_without_a_file() -> None:
    cfg = load_config(None, SCHEMAS)
    assert cfg.version == 1
    assert cfg.root == "/var/lib/berth"
    assert cfg.state == "/run/berth"
    assert cfg.imports == ["config.d/*.toml"]
    assert cfg.grpc == GrpcConfig()
    assert cfg.grpc.address == "/run/berth/berth.sock"
    assert cfg.debug == DebugConfig(level="info", format="console")
    assert cfg.metrics == MetricsConfig(address="")
    assert cfg.disabled_plugins == [] and cfg.required_plugins == []
    assert cfg.plugins == {OVERLAY: OverlayConfig(), REGISTRY: RegistryConfig()}
    assert cfg.sources == []


def test_render_default_round_trips_to_the_defaults(cwd: Path) -> None:
    text = render_default(SCHEMAS)
    assert text == render_default(dict(reversed(SCHEMAS.items())))  # deterministic, sorted
    tomllib.loads(text)
    write(cwd / "config.toml", text)
    cfg = load_config("config.toml", SCHEMAS)
    assert cfg.sources == ["config.toml"]
    cfg.sources = []
    assert cfg == load_config(None, SCHEMAS)


def test_render_default_comments_every_key_and_orders_tables() -> None:
    text = render_default(SCHEMAS)
    lines = text.splitlines()
    assert all(len(line) <= 88 for line in lines if line.startswith("#"))
    for i, line in enumerate(lines):
        if line and not line.startswith("#"):  # a key or a table header
            assert lines[i - 1].startswith("#"), f"no comment before {line!r}"
    headers = [line for line in lines if line.startswith("[")]
    assert headers == [
        "[grpc]",
        "[debug]",
        "[metrics]",
        f'[plugins."{REGISTRY}"]',
        f'[plugins."{REGISTRY}".hosts."docker.io"]',
        f'[plugins."{OVERLAY}"]',
        f'[plugins."{OVERLAY}".tuning]',
    ]
    assert 'address = ""' in lines
    assert "labels = {}" in lines
    assert "mount_options = []" in lines
    assert "# limit = 0  (unset by default)" in lines
    assert '# Commit mode. One of: "fast", "safe".' in lines
    assert text.index("version = 1") < text.index("[grpc]")


def test_render_default_of_core_only_is_valid() -> None:
    data = tomllib.loads(render_default({}))
    assert data["grpc"]["address"] == "/run/berth/berth.sock"
    assert "plugins" not in data


# -- messages: unknown keys ---------------------------------------------------------------


def test_unknown_key_in_plugin_table_names_path_line_and_suggestion(cwd: Path) -> None:
    text = """
    version = 1

    [plugins."berth.snapshotter.v1.overlayfs"]
    mount_optons = ["index=off"]
    """
    assert problems_of(text, cwd) == [
        'plugins."berth.snapshotter.v1.overlayfs".mount_optons: unknown key, '
        "did you mean mount_options? (config.toml:4)"
    ]


def test_unknown_keys_top_level_grpc_and_plugin_name(cwd: Path) -> None:
    text = """
    roots = "/var/lib/berth"
    [grpc]
    # the socket
    adress = "/run/x.sock"

    [plugins."berth.snapshotter.v1.overlayfz"]
    mount_options = []
    """
    assert problems_of(text, cwd) == [
        "roots: unknown key, did you mean root? (config.toml:1)",
        "grpc.adress: unknown key, did you mean address? (config.toml:4)",
        'plugins."berth.snapshotter.v1.overlayfz": unknown plugin, '
        'did you mean "berth.snapshotter.v1.overlayfs"? (config.toml:6)',
    ]


def test_typo_of_plugins_table_suggests_plugins(cwd: Path) -> None:
    text = """
    [plugin."berth.snapshotter.v1.overlayfs"]
    sync = true
    """
    assert problems_of(text, cwd) == ["plugin: unknown key, did you mean plugins? (config.toml:1)"]


# -- messages: types and values -----------------------------------------------------------


def test_wrong_types_say_what_was_expected(cwd: Path) -> None:
    text = """
    [grpc]
    uid = "0"
    [plugins."berth.snapshotter.v1.overlayfs"]
    sync = 1
    mount_options = [
        "a",
        7,
    ]
    labels = { team = "x", n = 1 }
    ratio = "half"
    tuning = 5
    """
    assert problems_of(text, cwd) == [
        'grpc.uid: expected an integer, got a string ("0") (config.toml:2)',
        'plugins."berth.snapshotter.v1.overlayfs".sync: expected a boolean, got an integer (1) '
        "(config.toml:4)",
        'plugins."berth.snapshotter.v1.overlayfs".mount_options[1]: expected a string, '
        "got an integer (7) (config.toml:7)",
        'plugins."berth.snapshotter.v1.overlayfs".labels.n: expected a string, got an integer (1) '
        "(config.toml:9)",
        'plugins."berth.snapshotter.v1.overlayfs".ratio: expected a number, got a string ("half") '
        "(config.toml:10)",
        'plugins."berth.snapshotter.v1.overlayfs".tuning: expected a table, got an integer (5) '
        "(config.toml:11)",
    ]


def test_whole_value_of_wrong_kind_names_the_collection_type(cwd: Path) -> None:
    text = """
    disabled_plugins = "berth.snapshotter.v1.overlayfs"
    """
    assert problems_of(text, cwd) == [
        'disabled_plugins: expected an array of strings, got a string ("berth.snapshotter.v1.overlayfs") '
        "(config.toml:1)"
    ]


def test_literal_and_choices_list_allowed_values(cwd: Path) -> None:
    text = """
    [debug]
    level = "inf"
    format = "yaml"
    [plugins."berth.images.v1.registry"]
    flavour = "fancey"
    """
    assert problems_of(text, cwd) == [
        'debug.level: expected one of "debug", "info", "warning", "error", got "inf", '
        'did you mean "info"? (config.toml:2)',
        'debug.format: expected one of "console", "json", got "yaml" (config.toml:3)',
        'plugins."berth.images.v1.registry".flavour: expected one of "plain", "fancy", got "fancey", '
        'did you mean "fancy"? (config.toml:5)',
    ]


def test_float_accepts_int_and_validate_problem_has_line(cwd: Path) -> None:
    write(cwd / "config.toml", f'[plugins."{OVERLAY}"]\nratio = 1\n')
    assert load_config("config.toml", SCHEMAS).plugins[OVERLAY].ratio == 1.0
    text = f"""
    [plugins."{OVERLAY}"]
    sync = false
    ratio = 3
    """
    assert problems_of(text, cwd) == [
        f'plugins."{OVERLAY}".ratio: must be between 0 and 1, got 3.0 (config.toml:3)'
    ]


def test_core_value_checks(cwd: Path) -> None:
    text = """
    version = 2
    root = "var/lib/berth"
    [grpc]
    address = "berth.sock"
    uid = -1
    [metrics]
    address = "localhost"
    """
    assert problems_of(text, cwd) == [
        "version: unsupported config version 2, this berthd reads version 1 (config.toml:1)",
        'root: expected an absolute path, got "var/lib/berth" (config.toml:2)',
        'grpc.address: expected an absolute unix socket path (optionally prefixed "unix://"), '
        'got "berth.sock" (config.toml:4)',
        "grpc.uid: expected an id >= 0, got -1 (config.toml:5)",
        'metrics.address: expected "" (off), "host:port" (TCP, IPv6 as "[::1]:port") or an absolute '
        'unix socket path, got "localhost" (config.toml:7)',
    ]


@pytest.mark.parametrize(
    "metrics", ["127.0.0.1:9100", ":0", "[::1]:9100", "/run/m.sock", "unix:///run/m.sock"]
)
def test_valid_addresses_are_normalised(cwd: Path, metrics: str) -> None:
    write(cwd / "config.toml", f'[grpc]\naddress = "unix:///run/b.sock"\n[metrics]\naddress = "{metrics}"\n')
    cfg = load_config("config.toml", SCHEMAS)
    assert cfg.grpc.address == "/run/b.sock"
    assert cfg.metrics.address == metrics.removeprefix("unix://")


def test_plugin_lists_must_name_registered_plugins(cwd: Path) -> None:
    text = """
    disabled_plugins = ["berth.snapshotter.v1", "berth.api.v1.version"]
    required_plugins = ["berth.snapshotter.v1.overlayf", "berth.snapshotter.v1"]
    """
    assert problems_of(text, cwd) == [
        'disabled_plugins[1]: no registered plugin or plugin type "berth.api.v1.version" (config.toml:1)',
        'required_plugins[0]: no registered plugin or plugin type "berth.snapshotter.v1.overlayf", '
        'did you mean "berth.snapshotter.v1.overlayfs"? (config.toml:2)',
        'required_plugins[1]: "berth.snapshotter.v1" is also in disabled_plugins (config.toml:2)',
    ]
    # plugins without a config dataclass are known through plugin_names
    write(cwd / "config.toml", 'disabled_plugins = ["berth.api.v1.version"]\n')
    cfg = load_config("config.toml", SCHEMAS, plugin_names=["berth.api.v1.version"])
    assert cfg.disabled_plugins == ["berth.api.v1.version"]


def test_nested_tables_and_dict_of_dataclasses_load(cwd: Path) -> None:
    text = f"""
    [plugins."{OVERLAY}"]
    tuning.depth = 9
    labels = {{ team = "core" }}
    limit = 10
    [plugins."{REGISTRY}".hosts."quay.io"]
    endpoint = "https://quay.io"
    """
    write(cwd / "config.toml", text)
    cfg = load_config("config.toml", SCHEMAS)
    overlay = cfg.plugins[OVERLAY]
    assert overlay.tuning == Tuning(depth=9)
    assert overlay.labels == {"team": "core"}
    assert overlay.limit == 10
    assert cfg.plugins[REGISTRY].hosts == {"quay.io": HostConfig(endpoint="https://quay.io")}


def test_unknown_key_in_dict_of_dataclasses_entry(cwd: Path) -> None:
    text = f"""
    [plugins."{REGISTRY}".hosts."quay.io"]
    endpoint = "https://quay.io"
    skip_verfy = true
    """
    assert problems_of(text, cwd) == [
        f'plugins."{REGISTRY}".hosts."quay.io".skip_verfy: unknown key, did you mean skip_verify? '
        "(config.toml:3)"
    ]


# -- files ------------------------------------------------------------------------------------


def test_malformed_toml_keeps_line_and_column(cwd: Path) -> None:
    problems = problems_of("version = 1\n[grpc]\naddress = \n", cwd)
    assert len(problems) == 1
    assert problems[0] == "invalid TOML: Invalid value (at line 3, column 11) (config.toml:3)"


def test_missing_file_is_named(cwd: Path) -> None:
    assert check_config("nope.toml", SCHEMAS) == ["cannot read nope.toml: No such file or directory"]
    with pytest.raises(ConfigError, match=r"nope\.toml") as info:
        load_config("nope.toml", SCHEMAS)
    assert isinstance(info.value, InvalidArgument)


def test_all_problems_reported_together(cwd: Path) -> None:
    text = """
    bogus = 1
    [grpc]
    uid = "x"
    [debug]
    level = "loud"
    """
    write(cwd / "config.toml", text)
    with pytest.raises(ConfigError) as info:
        load_config("config.toml", SCHEMAS)
    assert len(info.value.problems) == 3
    assert str(info.value) == "\n".join(info.value.problems)
    assert [p.rsplit(":", 1)[1] for p in info.value.problems] == ["1)", "3)", "5)"]


def test_imports_merge_in_order_relative_to_the_importing_file(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    main = write(
        etc / "config.toml",
        f"""
        root = "/main"
        disabled_plugins = ["berth.snapshotter.v1"]
        [plugins."{OVERLAY}"]
        mount_options = ["a", "b"]
        sync = false
        """,
    )
    write(
        etc / "config.d" / "20-late.toml", f'root = "/late"\n[plugins."{OVERLAY}"]\nmount_options = ["z"]\n'
    )
    write(
        etc / "config.d" / "10-early.toml",
        f'root = "/early"\nstate = "/early"\n[plugins."{OVERLAY}"]\nratio = 0.25\n',
    )
    write(etc / "config.d" / "ignored.txt", "this is not toml = = =")
    cfg = load_config(main, SCHEMAS)
    assert cfg.sources == [str(main), str(etc / "config.d/10-early.toml"), str(etc / "config.d/20-late.toml")]
    assert (cfg.root, cfg.state) == ("/late", "/early")
    overlay = cfg.plugins[OVERLAY]
    assert overlay.mount_options == ["z"]  # arrays replace
    assert (overlay.sync, overlay.ratio) == (False, 0.25)  # tables merge key by key
    assert cfg.disabled_plugins == ["berth.snapshotter.v1"]
    assert cfg.imports == ["config.d/*.toml"]


def test_explicit_imports_absolute_nested_and_cyclic(tmp_path: Path) -> None:
    main = write(tmp_path / "config.toml", 'imports = ["extra/a.toml"]\nroot = "/main"\n')
    write(tmp_path / "extra" / "a.toml", f'imports = ["{tmp_path}/b.toml"]\nroot = "/a"\n')
    write(tmp_path / "b.toml", 'imports = ["config.toml", "extra/a.toml"]\nroot = "/b"\nstate = "/b"\n')
    cfg = load_config(main, SCHEMAS)
    assert cfg.sources == [str(main), str(tmp_path / "extra/a.toml"), f"{tmp_path}/b.toml"]
    assert (cfg.root, cfg.state) == ("/b", "/b")
    assert cfg.imports == ["extra/a.toml"]


def test_problem_in_an_import_names_the_import_and_its_line(cwd: Path) -> None:
    write(cwd / "config.toml", "[grpc]\nuid = 1\n")
    write(cwd / "config.d" / "50-x.toml", "# comment\n\n[grpc]\nuid = 2\nbogus = 1\n")
    write(cwd / "config.d" / "60-y.toml", "[debug]\nlevel = 3\n")
    write(cwd / "config.d" / "70-z.toml", "[debug\n")
    assert check_config("config.toml", SCHEMAS) == [
        "grpc.bogus: unknown key (config.d/50-x.toml:5)",
        'debug.level: expected one of "debug", "info", "warning", "error", got 3 (config.d/60-y.toml:2)',
        "invalid TOML: Expected ']' at the end of a table declaration (at line 1, column 7) "
        "(config.d/70-z.toml:1)",
    ]


def test_imports_that_match_nothing(cwd: Path) -> None:
    text = """
    imports = ["config.d/*.toml", "missing.toml", 5]
    """
    assert problems_of(text, cwd) == [
        "imports[2]: expected a string, got an integer (5) (config.toml:1)",
    ]
    assert problems_of('imports = ["missing.toml"]\n', cwd) == [
        'imports[0]: no file "missing.toml" (config.toml:1)'
    ]


# -- line locator ---------------------------------------------------------------------------


def test_key_lines_skip_multiline_strings_and_arrays() -> None:
    text = "\n".join(
        [
            'a = """',
            "fake = 1",
            "[not.a.table]",
            '"""',
            "b = [",
            "  1, # comment ]",
            '  "x]",',
            "]",
            "'quoted key'.sub = { x = 1, y.z = [2] }",
            '[t."dotted.name"]',
            "c = '''",
            "[also.not]",
            "'''",
            "d = 1",
            "[[arr]]",
            "e = 1",
            "[[arr]]",
            "e = 2",
            "[arr.sub]",
            "f = 3",
        ]
    )
    tomllib.loads(text)
    lines = key_lines(text)
    assert lines[("a",)] == 1
    assert ("fake",) not in lines and ("not",) not in lines and ("also",) not in lines
    assert (lines[("b",)], lines[("b", 0)], lines[("b", 1)]) == (5, 6, 7)
    assert lines[("quoted key", "sub", "y", "z", 0)] == 9
    assert lines[("t", "dotted.name")] == 10
    assert lines[("t", "dotted.name", "c")] == 11
    assert lines[("t", "dotted.name", "d")] == 14
    assert (lines[("arr", 0, "e")], lines[("arr", 1, "e")]) == (16, 18)
    assert lines[("arr", 1, "sub", "f")] == 20


def test_format_path_quotes_dotted_components() -> None:
    assert format_path(("plugins", OVERLAY, "mount_options", 2)) == (
        'plugins."berth.snapshotter.v1.overlayfs".mount_options[2]'
    )
    assert format_path(("a b", 'q"')) == '"a b"."q\\""'


def test_config_dataclass_fields_are_documented() -> None:
    from dataclasses import fields

    for cls in (Config, GrpcConfig, DebugConfig, MetricsConfig):
        for f in fields(cls):
            assert f.metadata.get("doc") or f.metadata.get("internal"), f"{cls.__name__}.{f.name}"


def test_plugin_without_config_dataclass_accepts_only_an_empty_table(cwd: Path) -> None:
    names = ["berth.grpc.v1.version"]
    write(cwd / "config.toml", '[plugins."berth.grpc.v1.version"]\n')
    assert check_config("config.toml", SCHEMAS, plugin_names=names) == []
    write(cwd / "config.toml", '[plugins."berth.grpc.v1.version"]\nverbose = true\n')
    assert check_config("config.toml", SCHEMAS, plugin_names=names) == [
        'plugins."berth.grpc.v1.version".verbose: unknown key, this plugin has no configuration keys '
        "(config.toml:2)"
    ]
    # a None schema (registered, no dataclass) means the same and gets no instance
    write(cwd / "config.toml", 'disabled_plugins = ["berth.grpc.v1.version"]\n')
    cfg = load_config("config.toml", {**SCHEMAS, "berth.grpc.v1.version": None})
    assert "berth.grpc.v1.version" not in cfg.plugins


def test_problems_are_ordered_by_file_then_line(cwd: Path) -> None:
    write(cwd / "config.toml", "[grpc]\nuid = 1\n\nbogus = 2\n")
    write(cwd / "config.d" / "10-a.toml", "version = = 1\n")
    write(cwd / "config.d" / "20-b.toml", "# b\nnope = 1\n")
    problems = check_config("config.toml", SCHEMAS)
    assert [p.rsplit("(", 1)[1] for p in problems] == [
        "config.toml:4)",
        "config.d/10-a.toml:1)",
        "config.d/20-b.toml:2)",
    ]

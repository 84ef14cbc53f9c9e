"""Registry hosts: containerd's hosts.toml directory, the config.toml table, defaults, credentials."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from daemon.config import load_config, render_default
from daemon.errors import InvalidArgument
from plugins.images.registry.config import HostConfig, RegistryConfig
from plugins.images.registry.hosts import (
    ALL_CAPABILITIES,
    Credentials,
    Endpoint,
    RegistryHosts,
    host_dirs,
    is_loopback,
    parse_duration,
    parse_hosts_file,
)

PULL = frozenset({"pull"})
PULL_RESOLVE = frozenset({"pull", "resolve"})
PLUGIN = "berth.images.v1.default"


def write_hosts(root: Path, host_dir: str, text: str) -> Path:
    d = root / host_dir
    d.mkdir(parents=True, exist_ok=True)
    (d / "hosts.toml").write_text(text)
    return d / "hosts.toml"


def summary(ep: Endpoint) -> tuple[str, str, str, frozenset[str]]:
    return ep.scheme, ep.host, ep.path, ep.capabilities


# -- hosts.toml, with containerd's documented examples ---------------------------------


# containerd's remotes/docker/config/hosts_test.go (TestParseHostFile)
CONTAINERD_TEST_TOML = """
server = "https://test-default.registry"
ca = "/etc/path/default"

[host."https://mirror.registry"]
  capabilities = ["pull"]
  ca = "/etc/certs/mirror.pem"

[host."https://mirror-bak.registry/us"]
  capabilities = ["pull"]
  skip_verify = true

[host."http://mirror.registry"]
  capabilities = ["pull"]

[host."https://test-1.registry"]
  capabilities = ["pull", "resolve", "push"]
  ca = ["/etc/certs/test-1-ca.pem", "/etc/certs/special.pem"]
  client = [["/etc/certs/client.cert", "/etc/certs/client.key"],["/etc/certs/client.pem", ""]]

[host."https://test-2.registry"]
  client = "/etc/certs/client.pem"

[host."https://test-3.registry"]
  client = ["/etc/certs/client-1.pem", "/etc/certs/client-2.pem"]
"""


def test_containerd_test_file(tmp_path: Path) -> None:
    eps = parse_hosts_file(CONTAINERD_TEST_TOML, tmp_path / "hosts.toml", "test-default.registry")
    assert [summary(ep) for ep in eps] == [
        ("https", "mirror.registry", "/v2", PULL),
        ("https", "mirror-bak.registry", "/us/v2", PULL),
        ("http", "mirror.registry", "/v2", PULL),
        ("https", "test-1.registry", "/v2", ALL_CAPABILITIES),
        ("https", "test-2.registry", "/v2", ALL_CAPABILITIES),
        ("https", "test-3.registry", "/v2", ALL_CAPABILITIES),
        ("https", "test-default.registry", "/v2", ALL_CAPABILITIES),
    ]
    assert eps[0].ca_files == ("/etc/certs/mirror.pem",) and not eps[0].skip_verify
    assert eps[1].skip_verify and eps[1].ca_files == ()
    assert eps[3].ca_files == ("/etc/certs/test-1-ca.pem", "/etc/certs/special.pem")
    assert eps[3].client_pairs == (
        ("/etc/certs/client.cert", "/etc/certs/client.key"),
        ("/etc/certs/client.pem", ""),
    )
    assert eps[4].client_pairs == (("/etc/certs/client.pem", ""),)
    assert eps[5].client_pairs == (("/etc/certs/client-1.pem", ""), ("/etc/certs/client-2.pem", ""))
    # the top-level keys are the server's (containerd's test leaves its ca out; the docs say it applies)
    assert eps[6].ca_files == ("/etc/path/default",)
    assert [ep.mirror for ep in eps] == [True] * 6 + [False]


def test_docs_simple_docker_hub(tmp_path: Path) -> None:
    write_hosts(
        tmp_path,
        "docker.io",
        'server = "https://docker.io"\n\n'
        '[host."https://registry-1.docker.io"]\n  capabilities = ["pull", "resolve"]\n',
    )
    eps = RegistryHosts(config_path=str(tmp_path)).endpoints("docker.io")
    assert [summary(ep) for ep in eps] == [
        ("https", "registry-1.docker.io", "/v2", PULL_RESOLVE),
        ("https", "docker.io", "/v2", ALL_CAPABILITIES),
    ]
    assert not eps[0].mirror  # registry-1.docker.io is docker.io itself: no ?ns=


def test_docs_local_mirror_with_relative_ca(tmp_path: Path) -> None:
    path = write_hosts(
        tmp_path,
        "docker.io",
        'server = "https://registry-1.docker.io"    # Exclude this to not use upstream\n'
        "\n"
        '[host."https://public-mirror.example.com"]\n'
        '  capabilities = ["pull"]                  # Requires less trust, won\'t resolve tag to digest\n'
        '[host."https://docker-mirror.internal"]\n'
        '  capabilities = ["pull", "resolve"]\n'
        '  ca = "docker-mirror.crt"                 # Or absolute path\n',
    )
    eps = RegistryHosts(config_path=str(tmp_path)).endpoints("docker.io")
    assert [(ep.host, ep.capabilities) for ep in eps] == [
        ("public-mirror.example.com", PULL),
        ("docker-mirror.internal", PULL_RESOLVE),
        ("registry-1.docker.io", ALL_CAPABILITIES),
    ]
    assert eps[1].ca_files == (str(path.parent / "docker-mirror.crt"),)
    assert eps[1].origin == str(path)


def test_docs_default_mirror_for_all_registries(tmp_path: Path) -> None:
    write_hosts(
        tmp_path, "_default", '[host."https://registry.example.com"]\n  capabilities = ["pull", "resolve"]\n'
    )
    hosts = RegistryHosts(config_path=str(tmp_path))
    eps = hosts.endpoints("quay.io")
    assert [summary(ep) for ep in eps] == [
        ("https", "registry.example.com", "/v2", PULL_RESOLVE),
        ("https", "quay.io", "/v2", ALL_CAPABILITIES),  # upstream after the mirror
    ]
    assert eps[0].mirror and not eps[1].mirror
    # loopback keeps its plain-HTTP default behind the mirror
    assert summary(hosts.endpoints("127.0.0.1:5000")[-1]) == (
        "http",
        "127.0.0.1:5000",
        "/v2",
        ALL_CAPABILITIES,
    )


def test_docs_only_the_mirror_as_server(tmp_path: Path) -> None:
    write_hosts(tmp_path, "_default", 'server = "https://registry.example.com"\n')
    eps = RegistryHosts(config_path=str(tmp_path)).endpoints("quay.io")
    assert [summary(ep) for ep in eps] == [("https", "registry.example.com", "/v2", ALL_CAPABILITIES)]
    assert eps[0].mirror  # another host than the image's registry: requests carry ?ns=quay.io


def test_docs_bypass_tls_and_headers_and_override_path(tmp_path: Path) -> None:
    text = """
server = "https://registry-1.docker.io"

[host."http://192.168.31.250:5000"]
  capabilities = ["pull", "resolve", "push"]
  skip_verify = true

[host."https://mirror.registry"]
  capabilities = ["pull"]
  ca = "/etc/certs/mirror.pem"
  skip_verify = false
  dial_timeout = "1s500ms"
  [host."https://mirror.registry".header]
    x-custom-2 = ["value1", "value2"]

[host."https://non-compliant-mirror.registry/v2/upstream"]
  capabilities = ["pull"]
  override_path = true

[header]
  x-custom-1 = "custom header"
"""
    eps = parse_hosts_file(text, tmp_path / "hosts.toml", "docker.io")
    assert [summary(ep) for ep in eps] == [
        ("http", "192.168.31.250:5000", "/v2", ALL_CAPABILITIES),
        ("https", "mirror.registry", "/v2", PULL),
        ("https", "non-compliant-mirror.registry", "/v2/upstream", PULL),
        ("https", "registry-1.docker.io", "/v2", ALL_CAPABILITIES),
    ]
    assert eps[0].skip_verify
    assert eps[1].header == (("x-custom-2", "value1"), ("x-custom-2", "value2"))
    assert eps[1].dial_timeout == pytest.approx(1.5)
    assert eps[3].header == (("x-custom-1", "custom header"),)


def test_server_without_scheme_is_https_and_paths_get_v2(tmp_path: Path) -> None:
    text = 'server = "registry.example.com:8443/prefix"\n[host."mirror.example.com/"]\n'
    eps = parse_hosts_file(text, tmp_path / "hosts.toml", "registry.example.com:8443")
    assert [summary(ep) for ep in eps] == [
        ("https", "mirror.example.com", "/v2", ALL_CAPABILITIES),
        ("https", "registry.example.com:8443", "/prefix/v2", ALL_CAPABILITIES),
    ]


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        (
            'server = "https://r"\ncapabilites = ["pull"]\n',
            "capabilites: unknown key, did you mean capabilities? ({f}:2)",
        ),
        (
            '[host."https://m"]\n  capabilities = ["pull"]\n  skipverify = true\n',
            'host."https://m".skipverify: unknown key, did you mean skip_verify? ({f}:3)',
        ),
        (
            '[host."https://m"]\ncapabilities = ["pul"]\n',
            "host.\"https://m\".capabilities[0]: unknown capability 'pul'",
        ),
        ('skip_verify = "yes"\n', 'skip_verify: expected a boolean, got a string ("yes") ({f}:1)'),
        (
            '[host."https://m"]\nclient = [["a", "b", "c"]]\n',
            'host."https://m".client[0]: expected a [certificate, key] pair',
        ),
        (
            '[host."ftp://m"]\n',
            "host.\"ftp://m\": invalid URL 'ftp://m': the scheme must be http or https ({f}:1)",
        ),
        ('server = "https://bad host"\n', "server: invalid URL 'https://bad host'"),
        ('dial_timeout = "soon"\n', "dial_timeout: invalid duration 'soon'"),
        (
            'server = "https://r"\nserver = "x"\n',
            "invalid hosts.toml: Cannot overwrite a value (at line 2, column 13) ({f})",
        ),
    ],
)
def test_bad_hosts_toml_names_file_key_and_line(tmp_path: Path, text: str, complaint: str) -> None:
    path = write_hosts(tmp_path, "registry.example.com", text)
    with pytest.raises(InvalidArgument) as err:
        RegistryHosts(config_path=str(tmp_path)).endpoints("registry.example.com")
    assert str(err.value).startswith("invalid hosts.toml: ")
    assert complaint.format(f=path) in str(err.value)
    assert str(path) in str(err.value)


def test_all_problems_of_a_file_are_reported(tmp_path: Path) -> None:
    path = write_hosts(tmp_path, "r.example", 'foo = 1\n[host."https://m"]\nbar = 2\n')
    with pytest.raises(InvalidArgument) as err:
        RegistryHosts(config_path=str(tmp_path)).endpoints("r.example")
    assert f"foo: unknown key ({path}:1)" in str(err.value)
    assert f'host."https://m".bar: unknown key ({path}:3)' in str(err.value)


def test_host_directory_lookup_order(tmp_path: Path) -> None:
    assert host_dirs(tmp_path, "myregistry.io:5000") == [
        tmp_path / "myregistry.io_5000_",
        tmp_path / "myregistry.io:5000",
        tmp_path / "_default",
    ]
    assert host_dirs(tmp_path, "docker.io") == [tmp_path / "docker.io", tmp_path / "_default"]
    hosts = RegistryHosts(config_path=str(tmp_path))
    write_hosts(tmp_path, "_default", 'server = "https://default.example"\n')
    assert hosts.endpoints("myregistry.io:5000")[0].host == "default.example"
    write_hosts(tmp_path, "myregistry.io:5000", 'server = "https://colon.example"\n')
    assert hosts.endpoints("myregistry.io:5000")[0].host == "colon.example"
    write_hosts(tmp_path, "myregistry.io_5000_", 'server = "https://underscore.example"\n')
    assert hosts.endpoints("myregistry.io:5000")[0].host == "underscore.example"  # read again: no restart
    assert hosts.endpoints("other.example")[0].host == "default.example"


def test_docker_certs_d_files_without_hosts_toml(tmp_path: Path) -> None:
    d = tmp_path / "registry.example.com:5000"
    d.mkdir()
    for name in ("ca.crt", "client.cert", "client.key", "lonely.cert", "notes.txt"):
        (d / name).write_text("x")
    (eps,) = [RegistryHosts(config_path=str(tmp_path)).endpoints("registry.example.com:5000")]
    assert [summary(ep) for ep in eps] == [("https", "registry.example.com:5000", "/v2", ALL_CAPABILITIES)]
    assert eps[0].ca_files == (str(d / "ca.crt"),)
    assert eps[0].client_pairs == ((str(d / "client.cert"), str(d / "client.key")),)


def test_missing_config_path_directory_means_defaults(tmp_path: Path) -> None:
    hosts = RegistryHosts(config_path=str(tmp_path / "absent"))
    assert summary(hosts.endpoints("quay.io")[0]) == ("https", "quay.io", "/v2", ALL_CAPABILITIES)


# -- defaults and config.toml ---------------------------------------------------------


@pytest.mark.parametrize(
    ("registry", "url"),
    [
        ("docker.io", "https://registry-1.docker.io/v2"),
        ("quay.io", "https://quay.io/v2"),
        ("10.0.0.1:5000", "https://10.0.0.1:5000/v2"),
        ("127.0.0.1:5000", "http://127.0.0.1:5000/v2"),
        ("127.1.2.3", "http://127.1.2.3/v2"),
        ("localhost:5000", "http://localhost:5000/v2"),
        ("localhost", "http://localhost/v2"),
        ("[::1]:5000", "http://[::1]:5000/v2"),
    ],
)
def test_defaults(registry: str, url: str) -> None:
    eps = RegistryHosts().endpoints(registry)
    assert [ep.url for ep in eps] == [url]
    assert eps[0].capabilities == ALL_CAPABILITIES and not eps[0].mirror and eps[0].credentials is None


def test_is_loopback() -> None:
    assert all(
        is_loopback(h) for h in ("localhost", "LOCALHOST:1", "127.0.0.1", "127.9.9.9:80", "[::1]:5000", "::1")
    )
    assert not any(is_loopback(h) for h in ("localhost.example.com", "10.0.0.1", "[::2]:5000", "docker.io"))


def test_config_entry_mirrors_server_and_tls() -> None:
    entry = HostConfig(
        mirrors=["https://mirror.example.com", "127.0.0.1:6000", "mirror2.example.com/prefix"],
        capabilities=["pull"],
        ca_file="/etc/berth/ca.pem",
        client_cert="/etc/berth/c.pem",
        header={"X-Trace": "1"},
    )
    eps = RegistryHosts({"registry.example.com": entry}).endpoints("registry.example.com")
    assert [summary(ep) for ep in eps] == [
        ("https", "mirror.example.com", "/v2", PULL),
        ("http", "127.0.0.1:6000", "/v2", PULL),  # loopback: plain HTTP
        ("https", "mirror2.example.com", "/prefix/v2", PULL),
        ("https", "registry.example.com", "/v2", ALL_CAPABILITIES),
    ]
    assert {(ep.ca_files, ep.client_pairs, ep.header) for ep in eps} == {
        (("/etc/berth/ca.pem",), (("/etc/berth/c.pem", ""),), (("X-Trace", "1"),))
    }
    assert [ep.mirror for ep in eps] == [True, True, True, False]
    assert eps[0].origin == 'config.toml hosts."registry.example.com"'


@pytest.mark.parametrize(
    ("entry", "url"),
    [
        (HostConfig(plain_http=True), "http://10.0.0.1:5000/v2"),
        (HostConfig(plain_http=False, server="127.0.0.1:5000"), "https://127.0.0.1:5000/v2"),
        (HostConfig(server="https://10.0.0.1:5000/sub/"), "https://10.0.0.1:5000/sub/v2"),
        (HostConfig(skip_verify=True), "https://10.0.0.1:5000/v2"),
    ],
)
def test_config_entry_scheme(entry: HostConfig, url: str) -> None:
    assert RegistryHosts({"10.0.0.1:5000": entry}).endpoints("10.0.0.1:5000")[-1].url == url


def test_loopback_server_stays_plain_http_unless_told(tmp_path: Path) -> None:
    hosts = RegistryHosts({"127.0.0.1:5000": HostConfig(plain_http=False)})
    assert hosts.endpoints("127.0.0.1:5000")[0].url == "https://127.0.0.1:5000/v2"
    hosts = RegistryHosts({"127.0.0.1:5000": HostConfig(ca_file="/ca.pem", server="https://127.0.0.1:5000")})
    assert hosts.endpoints("127.0.0.1:5000")[0].url == "https://127.0.0.1:5000/v2"


def test_config_entry_with_endpoint_keys_wins_over_hosts_toml(tmp_path: Path) -> None:
    write_hosts(tmp_path, "registry.example.com", '[host."https://toml-mirror.example"]\n')
    hosts = RegistryHosts(
        {"registry.example.com": HostConfig(mirrors=["https://cfg-mirror.example"])}, str(tmp_path)
    )
    assert [ep.host for ep in hosts.endpoints("registry.example.com")] == [
        "cfg-mirror.example",
        "registry.example.com",
    ]


def test_credentials_only_entry_combines_with_hosts_toml(tmp_path: Path) -> None:
    write_hosts(
        tmp_path, "registry.example.com", '[host."https://mirror.example"]\ncapabilities = ["pull"]\n'
    )
    hosts = RegistryHosts(
        {
            "registry.example.com": HostConfig(username="me", password="pw"),
            "mirror.example": HostConfig(registry_token="tok"),
        },
        str(tmp_path),
    )
    mirror, server = hosts.endpoints("registry.example.com")
    assert (mirror.host, server.host) == ("mirror.example", "registry.example.com")
    assert mirror.credentials == Credentials(registry_token="tok")  # by the host it points at
    assert server.credentials == Credentials("me", "pw")


def test_registry_credentials_do_not_leak_to_mirrors() -> None:
    hosts = RegistryHosts(
        {"docker.io": HostConfig(username="me", password="pw", mirrors=["https://m.example"])}
    )
    mirror, server = hosts.endpoints("docker.io")
    assert mirror.credentials is None
    assert server.host == "registry-1.docker.io" and server.credentials == Credentials("me", "pw")


def test_credentials_forms_and_repr_hides_secrets() -> None:
    auth = base64.b64encode(b"user:pa:ss").decode()
    creds = Credentials.from_host_config(HostConfig(auth=auth))
    assert creds == Credentials("user", "pa:ss")
    assert "pa:ss" not in repr(creds) and "user" in repr(creds)
    assert Credentials.from_host_config(HostConfig(plain_http=True)) is None
    assert Credentials("a", "b").key != Credentials("a", "c").key
    assert not Credentials()


def test_parse_duration() -> None:
    assert parse_duration("1s") == 1.0
    assert parse_duration("500ms") == pytest.approx(0.5)
    assert parse_duration("1m30s") == 90.0
    assert parse_duration("0") == 0.0
    for bad in ("", "1", "s", "1x", "1s "):
        with pytest.raises(ValueError, match="invalid duration"):
            parse_duration(bad)


# -- the config.toml schema ----------------------------------------------------------


def load(tmp_path: Path, text: str) -> RegistryConfig:
    path = tmp_path / "config.toml"
    path.write_text(f'version = 1\nimports = []\n[plugins."{PLUGIN}"]\n{text}')
    cfg = load_config(path, {PLUGIN: RegistryConfig}).plugins[PLUGIN]
    assert isinstance(cfg, RegistryConfig)
    return cfg


def test_config_toml_table(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        'config_path = "/etc/containerd/certs.d"\nretry_attempts = 3\n'
        f'[plugins."{PLUGIN}".hosts."127.0.0.1:5000"]\nplain_http = true\nusername = "u"\npassword = "p"\n'
        f'[plugins."{PLUGIN}".hosts."docker.io"]\n'
        'mirrors = ["https://mirror.gcr.io"]\ncapabilities = ["pull"]\n',
    )
    assert cfg.config_path == "/etc/containerd/certs.d" and cfg.retry_attempts == 3
    assert cfg.hosts["127.0.0.1:5000"] == HostConfig(plain_http=True, username="u", password="p")
    assert cfg.hosts["docker.io"].mirrors == ["https://mirror.gcr.io"]


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        (
            '[plugins."P".hosts."r.io"]\nmirros = []\n',
            'hosts."r.io".mirros: unknown key, did you mean mirrors?',
        ),
        ('[plugins."P".hosts."r.io"]\ncapabilities = ["pul"]\n', "capabilities: unknown capability 'pul'"),
        ('[plugins."P".hosts."r.io"]\nmirrors = ["ftp://m"]\n', "mirrors: invalid URL 'ftp://m'"),
        (
            '[plugins."P".hosts."r.io"]\nauth = "bm9jb2xvbg=="\n',
            'auth: expected base64 of "username:password"',
        ),
        ('[plugins."P".hosts."r.io"]\npassword = "p"\n', "password: set username too"),
        ('[plugins."P".hosts."r.io"]\nclient_key = "k"\n', "client_key: set client_cert too"),
        ('[plugins."P".hosts."r io"]\n', "hosts: 'r io' is not a registry host"),
        ("retry_attempts = 0\n", "retry_attempts: expected at least 1, got 0"),
        ("read_timeout = 0\n", "read_timeout: expected a number > 0"),
    ],
)
def test_config_toml_problems(tmp_path: Path, text: str, complaint: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        load(tmp_path, text.replace('"P"', f'"{PLUGIN}"'))
    assert complaint in str(err.value)
    assert "config.toml:" in str(err.value)


def test_defaults_render_and_load_back(tmp_path: Path) -> None:
    text = render_default({PLUGIN: RegistryConfig})
    assert "config_path" in text and "retry_attempts = 5" in text
    path = tmp_path / "config.toml"
    path.write_text(text)
    assert load_config(path, {PLUGIN: RegistryConfig}).plugins[PLUGIN] == RegistryConfig()


def test_invalid_entry_given_in_code_is_refused() -> None:
    with pytest.raises(InvalidArgument, match=r"hosts\.r\.io\.capabilities: unknown capability 'x'"):
        RegistryHosts({"r.io": HostConfig(capabilities=["x"])})
    with pytest.raises(InvalidArgument, match="registry host 'bad host'"):
        RegistryHosts().endpoints("bad host")

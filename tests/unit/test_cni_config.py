"""CNI configs from a conf dir, the per-plugin config derivation, results and the result cache."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from daemon.errors import FailedPrecondition, InvalidArgument
from plugins.cri.cni import cache
from plugins.cri.cni.config import config_files, load_default, parse
from plugins.cri.cni.invoke import CniPluginError, Invocation, _error, environment, find_plugin, plugin_config
from plugins.cri.cni.network import PodRef
from plugins.cri.cni.result import parse_result

BRIDGE = {"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local", "subnet": "10.244.1.0/24"}}


def write(conf_dir: Path, name: str, doc: Any) -> Path:
    path = conf_dir / name
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


# -- loading ---------------------------------------------------------------------


def test_conflist_is_loaded(tmp_path: Path) -> None:
    doc = {"cniVersion": "1.0.0", "name": "pods", "plugins": [BRIDGE, {"type": "portmap"}]}
    path = write(tmp_path, "10-pods.conflist", doc)
    net = load_default(tmp_path)
    assert (net.name, net.cni_version, net.source) == ("pods", "1.0.0", path)
    assert [p["type"] for p in net.plugins] == ["bridge", "portmap"]
    assert not net.disable_check


@pytest.mark.parametrize("suffix", [".conf", ".json"])
def test_single_config_is_wrapped_into_a_list(tmp_path: Path, suffix: str) -> None:
    write(tmp_path, "10-one" + suffix, {"cniVersion": "0.4.0", "name": "one", **BRIDGE})
    net = load_default(tmp_path)
    assert (net.name, net.cni_version) == ("one", "0.4.0")
    assert len(net.plugins) == 1 and net.plugins[0]["type"] == "bridge"


def test_lexical_order_and_first_valid_wins(tmp_path: Path) -> None:
    write(tmp_path, "20-b.conflist", {"cniVersion": "1.0.0", "name": "b", "plugins": [BRIDGE]})
    write(tmp_path, "10-a.conf", {"cniVersion": "1.0.0", "name": "a", "plugins": []})  # no "type": skipped
    write(tmp_path, "05-broken.conflist", "{not json")
    write(tmp_path, "30-c.conflist", {"cniVersion": "1.0.0", "name": "c", "plugins": [BRIDGE]})
    write(tmp_path, "00-ignored.txt", "whatever")
    assert [p.name for p in config_files(tmp_path)] == [
        "05-broken.conflist",
        "10-a.conf",
        "20-b.conflist",
        "30-c.conflist",
    ]
    assert load_default(tmp_path).name == "b"


def test_no_config_names_the_dir(tmp_path: Path) -> None:
    with pytest.raises(FailedPrecondition) as err:
        load_default(tmp_path / "missing")
    assert err.value.message == f"no network config found in {tmp_path / 'missing'}"


def test_only_invalid_configs_list_their_reasons(tmp_path: Path) -> None:
    write(tmp_path, "05-broken.conflist", "{not json")
    write(tmp_path, "10-notype.conflist", {"cniVersion": "1.0.0", "name": "n", "plugins": [{"bridge": "x"}]})
    with pytest.raises(FailedPrecondition) as err:
        load_default(tmp_path)
    message = err.value.message
    assert message.startswith(f"no network config found in {tmp_path} (skipped: ")
    assert f"{tmp_path / '05-broken.conflist'}: invalid JSON" in message
    assert f'{tmp_path / "10-notype.conflist"}: plugins[0]: missing "type"' in message


@pytest.mark.parametrize(
    ("name", "doc", "fragment"),
    [
        ("a.conflist", "[1, 2", "invalid JSON"),
        ("a.conflist", "[]", "must be a JSON object"),
        ("a.conflist", {"cniVersion": "1.0.0", "plugins": [BRIDGE]}, 'missing "name"'),
        ("a.conflist", {"name": "x", "plugins": [BRIDGE]}, 'missing "cniVersion"'),
        ("a.conflist", {"name": "x", "cniVersion": "9.9.9", "plugins": [BRIDGE]}, "is not supported"),
        (
            "a.conflist",
            {"name": "x", "cniVersion": "1.0.0", "plugins": []},
            '"plugins" must be a non-empty list',
        ),
        (
            "a.conflist",
            {"name": "x", "cniVersion": "1.0.0", "plugins": [{"type": "../sh"}]},
            "plain binary name",
        ),
        ("a.conflist", {"name": "a/b", "cniVersion": "1.0.0", "plugins": [BRIDGE]}, "\"name\" 'a/b'"),
        ("a.conf", {"name": "x", "cniVersion": "1.0.0"}, 'missing "type"'),
        ("a.conf", {"name": "x", "cniVersion": "1.0.0", "type": "b", "disableCheck": "yes"}, "disableCheck"),
    ],
)
def test_invalid_configs_name_file_and_field(tmp_path: Path, name: str, doc: Any, fragment: str) -> None:
    raw = doc if isinstance(doc, str) else json.dumps(doc)
    with pytest.raises(InvalidArgument) as err:
        parse(raw, tmp_path / name)
    assert err.value.message.startswith(str(tmp_path / name) + ":")
    assert fragment in err.value.message


def test_cni_versions_list_picks_newest_supported(tmp_path: Path) -> None:
    doc = {"cniVersions": ["0.4.0", "1.0.0", "7.0.0"], "name": "x", "plugins": [BRIDGE]}
    assert parse(json.dumps(doc), tmp_path / "x.conflist").cni_version == "1.0.0"


# -- deriving a plugin's stdin config and environment -----------------------------


def test_plugin_config_injects_name_version_prev_result_and_runtime_config() -> None:
    plugin = {"type": "portmap", "capabilities": {"portMappings": True, "bandwidth": False}}
    prev = {"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.2/24"}]}
    ports = [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]
    conf = plugin_config(
        plugin,
        name="pods",
        cni_version="1.0.0",
        prev_result=prev,
        capability_args={"portMappings": ports, "bandwidth": {"ingressRate": 1}, "ipRanges": []},
    )
    assert conf["name"] == "pods" and conf["cniVersion"] == "1.0.0"
    assert conf["prevResult"] == prev
    assert conf["runtimeConfig"] == {"portMappings": ports}
    assert "prevResult" not in plugin_config({"type": "bridge"}, name="p", cni_version="1.0.0")
    no_caps = plugin_config({"type": "bridge"}, name="p", cni_version="1.0.0", capability_args={"x": 1})
    assert "runtimeConfig" not in no_caps


def test_environment_carries_cni_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CNI_STALE", "1")
    call = Invocation(
        "sb1", "/run/ns/net", "eth0", (("IgnoreUnknown", "1"), *PodRef("ns", "pod", "u1").cni_args("sb1"))
    )
    env = environment("ADD", call, ["/opt/cni/bin", "/usr/lib/cni"])
    assert env["CNI_COMMAND"] == "ADD"
    assert (
        env["CNI_CONTAINERID"] == "sb1" and env["CNI_NETNS"] == "/run/ns/net" and env["CNI_IFNAME"] == "eth0"
    )
    assert env["CNI_ARGS"] == (
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=pod;K8S_POD_INFRA_CONTAINER_ID=sb1;K8S_POD_UID=u1"
    )
    assert env["CNI_PATH"] == "/opt/cni/bin:/usr/lib/cni"
    assert "CNI_STALE" not in env and "PATH" in env


def test_cni_args_reject_separators() -> None:
    with pytest.raises(InvalidArgument, match="K8S_POD_NAME"):
        Invocation("sb", "", "eth0", (("K8S_POD_NAME", "a;b=c"),)).cni_args()


def test_missing_binary_names_it_and_the_dirs(tmp_path: Path) -> None:
    with pytest.raises(FailedPrecondition) as err:
        find_plugin("nope", [tmp_path, "/usr/lib/cni-none"])
    assert (
        err.value.message == f'CNI plugin binary "nope" not found in bin_dirs [{tmp_path}, /usr/lib/cni-none]'
    )


def test_plugin_error_object_is_in_the_message() -> None:
    out = json.dumps({"cniVersion": "1.0.0", "code": 11, "msg": "try again", "details": "lock held"}).encode()
    err = _error("bridge", "ADD", 1, out, b"")
    assert isinstance(err, CniPluginError)
    assert (err.code, err.msg, err.details) == (11, "try again", "lock held")
    assert err.message == "CNI plugin bridge ADD failed (code 11): try again: lock held"
    plain = _error("bridge", "DEL", 2, b"", b"panic: oops\n")
    assert plain.message == "CNI plugin bridge DEL failed (exit status 2): panic: oops"


# -- results ----------------------------------------------------------------------


def test_pod_ip_is_the_first_ip_on_a_sandbox_interface() -> None:
    doc = {
        "cniVersion": "1.0.0",
        "interfaces": [
            {"name": "cni0", "mac": "aa:bb"},
            {"name": "veth1", "mac": "cc:dd"},
            {"name": "eth0", "mac": "ee:ff", "sandbox": "/run/ns/net"},
        ],
        "ips": [
            {"address": "10.1.0.1/24", "interface": 0},
            {"address": "10.244.3.7/24", "gateway": "10.244.3.1", "interface": 2},
            {"address": "fd00::7/64", "interface": 2},
        ],
        "routes": [{"dst": "10.244.0.0/16"}],
        "dns": {"nameservers": ["10.96.0.10"], "search": ["svc"]},
    }
    result = parse_result(doc, "bridge")
    assert result.pod_ip == "10.244.3.7"
    assert result.pod_ips == ["10.244.3.7", "fd00::7"]
    assert result.routes[0].dst == "10.244.0.0/16"
    assert result.dns.nameservers == ("10.96.0.10",) and result.dns.search == ("svc",)
    assert result.raw is doc


def test_legacy_result_and_no_ips() -> None:
    legacy = parse_result({"cniVersion": "0.2.0", "ip4": {"ip": "10.9.0.5/16", "gateway": "10.9.0.1"}}, "x")
    assert legacy.pod_ip == "10.9.0.5"
    assert parse_result({"cniVersion": "1.0.0"}, "x").pod_ip is None
    with pytest.raises(CniPluginError, match="CNI plugin x: malformed result"):
        parse_result({"ips": [{"gateway": "1.2.3.4"}]}, "x")


# -- cache --------------------------------------------------------------------------


def test_cache_round_trip_and_remove(tmp_path: Path) -> None:
    net = parse(
        json.dumps({"cniVersion": "1.0.0", "name": "pods", "plugins": [BRIDGE]}), tmp_path / "a.conflist"
    )
    entry = cache.CacheEntry(
        "sb1", "eth0", net, {"cniVersion": "1.0.0", "ips": []}, (("A", "1"),), {"x": [1]}
    )
    path = cache.save(tmp_path, entry)
    assert path == tmp_path / "results" / "pods-sb1-eth0"
    assert json.loads(path.read_text())["kind"] == "cniCacheV1"
    back = cache.load(tmp_path, "sb1", "eth0")
    assert back is not None
    assert back.network.plugins == net.plugins and back.network.name == "pods"
    assert (back.result, back.cni_args, back.capability_args) == (entry.result, (("A", "1"),), {"x": [1]})
    assert cache.load(tmp_path, "sb2", "eth0") is None
    assert cache.load(tmp_path, "sb1", "eth1") is None
    cache.remove(tmp_path, "pods", "sb1", "eth0")
    cache.remove(tmp_path, "pods", "sb1", "eth0")  # quiet the second time
    assert cache.load(tmp_path, "sb1", "eth0") is None


def test_corrupt_cache_entry_is_ignored(tmp_path: Path) -> None:
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "pods-sb1-eth0").write_text("{garbage")
    assert cache.load(tmp_path, "sb1", "eth0") is None

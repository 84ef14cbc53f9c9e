"""containerd's filter language: grammar, errors with positions, matching, adaptors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import betterproto
import pytest
from betterproto.lib.google.protobuf import Any as ProtoAny

from daemon import filters
from daemon.errors import InvalidArgument

# The corpus of containerd's own filter tests, as mappings.
CORPUS: list[dict[str, Any]] = [
    {"name": "foo", "labels": {"foo": "true"}},
    {"name": "bar"},
    {"name": "foo", "labels": {"foo": "present", "more complex label": "present"}},
    {"name": "bar", "labels": {"bar": "true"}},
    {"name": "fooer", "labels": {'more complex label with \\ and "': "present"}},
    {"name": "fooer", "labels": {'more complex label with \\ and ".post': "present"}},
    {"name": "baz", "other": "too complex, yo"},
    {"name": "bazo", "other": "abc"},
    {"name": "compound", "labels": {"foo": "omg_asdf.asdf-qwer"}},
]


def matching(*texts: str) -> list[int]:
    f = filters.parse(list(texts))
    return [i for i, obj in enumerate(CORPUS) if f.match(filters.adapt_mapping(obj))]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", list(range(9))),
        ("name", list(range(9))),
        ("labels.foo", [0, 2, 8]),
        ("labels.foo,name", [0, 2, 8]),
        ("labels.foo==true", [0]),
        ("labels.foo==omg_asdf.asdf-qwer", [8]),
        ("name==bar", [1, 3]),
        ("name!=bar", [0, 2, 4, 5, 6, 7, 8]),
        ("name==bar,labels.bar", [3]),
        ('other=="too complex, yo"', [6]),
        ("other~=[abc]+,name!=foo", [6, 7]),
        ("other~=/[abc]+/,name!=foo", [6, 7]),
        ("other~=/[abc]{1,2}/,name!=foo", [6, 7]),
        ("other~=|[abc]{1,2}|,name!=foo", [6, 7]),
        ('other~=/[abc]{0,1}"\\//,name!=foo', []),
        ("name==bar,labels.bar==true", [3]),
        ("name==bar,labels.bar==wrong", []),
        ('name==foo,labels."more complex label"', [2]),
        ('labels."more complex label with \\\\ and \\""==present', [4]),
        ('labels."more complex label with \\\\ and \\"".post==present', [5]),
        # absent fields read as "": != matches them, == never does
        ("other!=abc", [0, 1, 2, 3, 4, 5, 6, 8]),
        ("other==", None),  # a missing value is an error, see below
        # whitespace between tokens is tolerated
        (" name == bar , labels.bar ", [3]),
    ],
)
def test_containerd_corpus(text: str, expected: list[int] | None) -> None:
    if expected is None:
        with pytest.raises(InvalidArgument):
            matching(text)
        return
    assert matching(text) == expected


def test_several_strings_are_or() -> None:
    assert matching("name==bar", "labels.foo==true") == [0, 1, 3]
    assert matching("name==nothing", "name==nothing-either") == []


def test_empty_means_everything() -> None:
    assert filters.parse([]) is filters.ALWAYS
    assert filters.parse([""]) is filters.ALWAYS
    assert filters.parse(["name==x", ""]) is filters.ALWAYS  # containerd: "" matches all
    assert filters.parse("name==bar").match(
        filters.adapt_mapping({"name": "bar"})
    )  # a lone str is one filter


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # the error strings of containerd's own tests
        (
            "labels.|foo|==omg_asdf.asdf-qwer",
            "filters: parse error: [labels. >|||< foo|==omg_asdf.asdf-qwer]: invalid quote encountered",
        ),
        (
            'labels.?"more complex label with \\\\ and \\"".post==present',
            'filters: parse error: [labels. >|?|< "more complex label with \\\\ and \\"".post==present]: '
            "expected field or quoted",
        ),
        ("name==foo,", "filters: parse error: [name==foo,]: expected field or quoted"),
        ("labels.", "filters: parse error: [labels.]: expected field or quoted"),
        ("image~=,id?=?fbaq", "filters: parse error: [image~= >|,|< id?=?fbaq]: expected value or quoted"),
        (
            "labels.ns/key==value",
            "filters: parse error: [labels.ns >|/|< key==value]: quoted literal not terminated",
        ),
        (
            "labels.key==/value",
            "filters: parse error: [labels.key== >|/|< value]: quoted literal not terminated",
        ),
        # and more
        ("name=foo", 'filters: parse error: [name >|=|< foo]: unsupported operator "="'),
        ("name===foo", 'filters: parse error: [name >|=|< ==foo]: unsupported operator "==="'),
        ("name?foo", 'filters: parse error: [name >|?|< foo]: expected an operator ("=="|"!="|"~=")'),
        ("name==", "filters: parse error: [name==]: expected value or quoted"),
        ("name==.x", "filters: parse error: [name== >|.|< x]: expected value or quoted"),
        ("name==/x/", "filters: parse error: [name== >|/|< x/]: invalid quote encountered"),
        ("name==a b", "filters: parse error: [name==a  >|b|< ]: unexpected input: b"),
        (",name", "filters: parse error: [ >|,|< name]: expected field or quoted"),
        ('labels."\\g"', 'filters: parse error: [labels. >|"|< \\g"]: illegal escape sequence'),
        ('labels."\\xaz"', 'filters: parse error: [labels. >|"|< \\xaz"]: illegal numeric escape sequence'),
        ('labels."\\777"', 'filters: parse error: [labels. >|"|< \\777"]: illegal numeric escape sequence'),
        ('labels."a\nb"==x', 'filters: parse error: [labels. >|"|< a\nb"==x]: quoted literal not terminated'),
        ("name~=[a", "filters: parse error: [name~= >|[|< a]: invalid regular expression"),
        ("name~=/\\d/", "filters: parse error: [name~= >|/|< \\d/]: illegal escape sequence"),
    ],
)
def test_parse_errors_name_the_text_and_position(text: str, message: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        filters.parse([text])
    assert str(info.value).startswith(message)


def test_error_in_any_string_fails_the_whole_parse() -> None:
    with pytest.raises(InvalidArgument, match=r"\[name=x\]|name >\|=\|< x"):
        filters.parse(["name==ok", "name=x"])


@pytest.mark.parametrize(
    ("quoted", "decoded"),
    [
        ('"a\\tb\\nc"', "a\tb\nc"),
        ('"\\x41\\102\\u00e9\\U0001F600"', "AB\u00e9\U0001f600"),
        ('"\\xc3\\xa9"', "\u00e9"),  # \x escapes are bytes, as in Go
        ('"\\\\ \\""', '\\ "'),
        ('"a,b.c==d"', "a,b.c==d"),
        ('"\u725b"', "\u725b"),
    ],
)
def test_quoted_values_decode_go_escapes(quoted: str, decoded: str) -> None:
    f = filters.parse([f"name=={quoted}"])
    assert f.match(filters.adapt_mapping({"name": decoded}))
    assert not f.match(filters.adapt_mapping({"name": decoded + "x"}))


def test_regex_quotes_escape_their_delimiter() -> None:
    f = filters.parse(["name~=/^foo\\/bar$/"])
    assert f.match(filters.adapt_mapping({"name": "foo/bar"}))
    g = filters.parse(["name~=|^foo/bar$|"])
    assert g.match(filters.adapt_mapping({"name": "foo/bar"}))
    assert not g.match(filters.adapt_mapping({"name": "xfoo/bar"}))


def test_regex_is_a_search_not_anchored() -> None:
    f = filters.parse(["image~=library"])
    assert f.match(filters.adapt_mapping({"image": "docker.io/library/busybox"}))


def test_unicode_and_punctuated_values() -> None:
    assert filters.parse(["name==\u725b"]).match(filters.adapt_mapping({"name": "\u725b"}))
    f = filters.parse(['labels."io.kubernetes.pod.uid"==a-b_c.d:e'])
    assert f.match(filters.adapt_mapping({"labels": {"io.kubernetes.pod.uid": "a-b_c.d:e"}}))


# -- adaptors -----------------------------------------------------------------


@dataclass(eq=False, repr=False)
class Mount(betterproto.Message):
    type: str = betterproto.string_field(1)
    source: str = betterproto.string_field(2)


@dataclass(eq=False, repr=False)
class Thing(betterproto.Message):
    id: str = betterproto.string_field(1)
    ready: bool = betterproto.bool_field(2)
    pid: int = betterproto.uint32_field(3)
    labels: dict[str, str] = betterproto.map_field(  # noqa: RUF009
        4, betterproto.TYPE_STRING, betterproto.TYPE_STRING
    )
    mount: Mount = betterproto.message_field(5)  # noqa: RUF009
    extra: ProtoAny = betterproto.message_field(6)  # noqa: RUF009
    tags: list[str] = betterproto.string_field(7)  # noqa: RUF009 - repeated


def test_adapt_object_follows_containerd_field_rules() -> None:
    thing = Thing(id="c1", pid=42, labels={"a.b": "x"}, mount=Mount(type="bind"), tags=["t"])
    adapt = filters.adapt_object(thing)
    assert adapt(["id"]) == ("c1", True)
    assert adapt(["ready"]) == ("false", True)  # bools are always present
    assert adapt(["pid"]) == ("42", True)
    assert adapt(["labels", "a", "b"]) == ("x", True)  # rest of the path joined with "."
    assert adapt(["labels", "nope"]) == ("", False)
    assert adapt(["mount", "type"]) == ("bind", True)
    assert adapt(["mount", "source"]) == ("", False)  # empty string: absent
    assert adapt(["mount"]) == ("", False)  # a message is not a value
    assert adapt(["tags"]) == ("", False)  # repeated fields are not filterable
    assert adapt(["unknown"]) == ("", False)
    assert adapt([]) == ("", False)


def test_adapt_object_decodes_any_with_the_given_decoder() -> None:
    inner = Mount(type="overlay")
    packed = ProtoAny(type_url="test.Mount", value=bytes(inner))
    thing = Thing(extra=packed)

    def decode(value: ProtoAny) -> Any:
        return Mount().parse(value.value) if value.type_url == "test.Mount" else None

    assert filters.adapt_object(thing, decode_any=decode)(["extra", "type"]) == ("overlay", True)
    assert filters.adapt_object(thing)(["extra", "type"]) == ("", False)  # no decoder: unknown

    def broken(value: ProtoAny) -> Any:
        raise ValueError("corrupt")

    assert filters.adapt_object(thing, decode_any=broken)(["extra", "type"]) == ("", False)


def test_adapt_mapping_nested_and_labels() -> None:
    obj = {"name": "n", "spec": {"image": "busybox", "labels": {"k": "v"}}, "n": 3}
    f = filters.parse(["spec.image==busybox,spec.labels.k==v,n==3"])
    assert f.match(filters.adapt_mapping(obj))
    assert not filters.parse(["spec.image==alpine"]).match(filters.adapt_mapping(obj))

"""``oskctl graph``: the dependency graph as text and as Graphviz DOT, and its arguments."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from osk_daemon.control import oskctl, render
from osk_daemon.control.oskctl import build_parser, main

pytestmark = pytest.mark.timeout(30)


def plugin(name: str, **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": name,
        "version": "1.0.0",
        "wave": 0,
        "requires": [],
        "optional": [],
        "status": "healthy",
        "degraded_by": [],
        "offline_capable": False,
    }
    return base | fields


BRIEF_GRAPH: dict[str, Any] = {
    "plugins": [
        plugin("store", version="3.1.0"),
        plugin(
            "echo",
            version="2.3.0",
            wave=1,
            requires=["store"],
            optional=["cache"],
            status="degraded",
            degraded_by=["store"],
        ),
    ],
    "waves": [["store"], ["echo"]],
}


# -- text ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        pytest.param(
            BRIEF_GRAPH,
            "wave 0\n"
            "  store  3.1.0  healthy\n"
            "wave 1\n"
            "  echo   2.3.0  degraded (store down)  -> store; optional: cache",
            id="brief-example",
        ),
        pytest.param({"plugins": [], "waves": []}, "no plugins", id="empty"),
        pytest.param({}, "no plugins", id="no-keys"),
        pytest.param(
            {
                "plugins": [
                    plugin("a"),
                    plugin("b"),
                    plugin("web-ui", version="10.0.0", wave=1, requires=["a", "b"]),
                ],
                "waves": [["a", "b"], ["web-ui"]],
            },
            "wave 0\n"
            "  a       1.0.0   healthy\n"
            "  b       1.0.0   healthy\n"
            "wave 1\n"
            "  web-ui  10.0.0  healthy  -> a, b",
            id="two-in-one-wave",
        ),
        pytest.param(
            {"plugins": [plugin("x", optional=["y"], offline_capable=True)], "waves": [["x"]]},
            "wave 0\n  x  1.0.0  healthy  optional: y; offline-capable",
            id="optional-only-and-offline",
        ),
        pytest.param(
            {"plugins": [plugin("late", wave=2), plugin("stray", wave=None)]},
            "wave 2\n  late   1.0.0  healthy\nunscheduled\n  stray  1.0.0  healthy",
            id="no-waves-list-falls-back-to-wave-field",
        ),
        pytest.param(
            {"plugins": [{"name": "bare"}], "waves": [["bare", "ghost"]]},
            "wave 0\n  bare   -  -\n  ghost  -  -",
            id="missing-fields-and-unlisted-plugin",
        ),
    ],
)
def test_format_graph(graph: dict[str, Any], expected: str) -> None:
    assert render.format_graph(graph) == expected


def test_format_graph_orders_waves_by_the_waves_list() -> None:
    graph = {
        "plugins": [plugin("c", wave=1), plugin("a", wave=0), plugin("b", wave=0)],
        "waves": [["b", "a"], ["c"]],
    }
    lines = render.format_graph(graph).splitlines()
    assert [line.split()[0] for line in lines] == ["wave", "b", "a", "wave", "c"]


# -- DOT ----------------------------------------------------------------------------------------


def test_format_graph_dot_brief_example() -> None:
    assert render.format_graph_dot(BRIEF_GRAPH) == "\n".join(
        [
            "digraph osk {",
            "  node [shape=box];",
            '  "store" [label="store\\n3.1.0"];',
            '  "echo" [label="echo\\n2.3.0", style=filled, fillcolor="#ffffcc"];',
            '  "cache" [style=dashed];',
            '  "echo" -> "store";',
            '  "echo" -> "cache" [style=dashed];',
            "}",
        ]
    )


def test_format_graph_dot_empty() -> None:
    expected = "digraph osk {\n  node [shape=box];\n}"
    assert render.format_graph_dot({"plugins": [], "waves": []}) == expected
    assert render.format_graph_dot({}) == expected


@pytest.mark.parametrize(
    ("status", "fill"),
    [
        ("healthy", None),
        ("degraded", render.DOT_DEGRADED_FILL),
        ("unhealthy", render.DOT_DOWN_FILL),
        ("failed", render.DOT_DOWN_FILL),
        ("stopped", render.DOT_DOWN_FILL),
        ("recovering", None),
        ("waiting", None),
        ("unknown", None),
    ],
)
def test_format_graph_dot_colours_by_status(status: str, fill: str | None) -> None:
    dot = render.format_graph_dot({"plugins": [plugin("p", status=status)]})
    node = next(line for line in dot.splitlines() if line.startswith('  "p" ['))
    if fill is None:
        assert "fillcolor" not in node and "style" not in node
    else:
        assert f'style=filled, fillcolor="{fill}"' in node


@pytest.mark.parametrize(
    ("requires", "optional", "edges"),
    [
        ([], [], []),
        (["a"], [], ['  "p" -> "a";']),
        ([], ["a"], ['  "p" -> "a" [style=dashed];']),
        (["a", "b"], ["c"], ['  "p" -> "a";', '  "p" -> "b";', '  "p" -> "c" [style=dashed];']),
    ],
)
def test_format_graph_dot_edges_point_at_dependencies(
    requires: list[str], optional: list[str], edges: list[str]
) -> None:
    graph = {
        "plugins": [
            plugin("p", requires=requires, optional=optional),
            *(plugin(n) for n in ("a", "b", "c")),
        ]
    }
    dot = render.format_graph_dot(graph)
    assert [line for line in dot.splitlines() if "->" in line] == edges
    assert not [line for line in dot.splitlines() if "->" not in line and "dashed" in line]


@pytest.mark.parametrize(
    ("text", "quoted"),
    [
        ("store", '"store"'),
        ("web-ui", '"web-ui"'),
        ("my.plugin-2", '"my.plugin-2"'),
        ('say "hi"', '"say \\"hi\\""'),
        ("back\\slash", '"back\\\\slash"'),
        ("two\nlines", '"two\\nlines"'),
        ("", '""'),
    ],
)
def test_dot_quote(text: str, quoted: str) -> None:
    assert render.dot_quote(text) == quoted


def test_format_graph_dot_quotes_names_with_dashes_everywhere() -> None:
    graph = {
        "plugins": [
            plugin("web-ui", version="1.0.0-rc.1", requires=["auth-db"], optional=["x-cache"]),
            plugin("auth-db", status="failed"),
        ]
    }
    lines = render.format_graph_dot(graph).splitlines()
    assert '  "web-ui" [label="web-ui\\n1.0.0-rc.1"];' in lines
    assert '  "auth-db" [label="auth-db\\n1.0.0", style=filled, fillcolor="#ffcccc"];' in lines
    assert '  "x-cache" [style=dashed];' in lines
    assert '  "web-ui" -> "auth-db";' in lines
    assert '  "web-ui" -> "x-cache" [style=dashed];' in lines


# -- arguments ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "dot", "as_json"),
    [
        (["graph"], False, False),
        (["graph", "--dot"], True, False),
        (["graph", "--json"], False, True),
        (["--json", "graph"], False, True),
    ],
)
def test_parser_accepts_graph(argv: list[str], dot: bool, as_json: bool) -> None:
    ns = build_parser().parse_args(argv)
    assert ns.command == "graph"
    assert ns.dot is dot
    assert getattr(ns, "json", False) is as_json


def test_graph_dot_and_json_together_is_bad_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["graph", "--dot", "--json"])
    assert exc.value.code == 2
    assert "--dot and --json are mutually exclusive" in capsys.readouterr().err


def test_graph_takes_no_positional_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["graph", "store"])
    assert exc.value.code == 2
    capsys.readouterr()


@pytest.mark.parametrize(
    ("flags", "show"),
    [
        ([], render.format_graph),
        (["--dot"], render.format_graph_dot),
        (["--json"], render.format_json),
    ],
)
def test_graph_sends_graph_with_no_args_and_prints_the_answer(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    flags: list[str],
    show: Any,
) -> None:
    sent: list[tuple[str, dict[str, Any]]] = []

    def fake_request(
        choice: oskctl.SocketChoice, timeout: float, cmd: str, args: dict[str, Any]
    ) -> Any:
        sent.append((cmd, args))
        return json.loads(json.dumps(BRIEF_GRAPH))

    monkeypatch.setattr(oskctl, "_request", fake_request)
    assert main(["--socket", str(tmp_path / "ctl.sock"), "graph", *flags]) == 0
    assert sent == [("graph", {})]
    assert capsys.readouterr().out == show(BRIEF_GRAPH) + "\n"

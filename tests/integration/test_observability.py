"""Events on the ZeroMQ PUB socket and logfmt logs, from a real daemon."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import zmq

from tests.integration.harness import daemon_config, plugin_block, running_daemon

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def test_events_are_published_by_topic_on_the_pub_socket() -> None:
    with running_daemon(daemon_config(plugin_block("echo"))) as d:
        sock = zmq.Context.instance().socket(zmq.SUB)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SUBSCRIBE, b"plugin:")
            path = d.runtime / "events.sock"
            assert oct(path.stat().st_mode & 0o777) == "0o600"
            sock.connect(f"ipc://{path}")
            # a PUB socket drops what it sends before the subscription has arrived:
            # restart the plugin until one of its events gets through
            deadline = time.monotonic() + 20
            while not sock.poll(200):
                assert time.monotonic() < deadline, "no event arrived on the PUB socket"
                d.ctl("restart", name="echo")
            while sock.poll(200):  # what that restart still sends
                sock.recv_multipart()
            pid = d.row("echo")["pid"]
            os.kill(pid, signal.SIGKILL)
            seen: list[tuple[str, dict]] = []
            while time.monotonic() < deadline:
                assert sock.poll(int((deadline - time.monotonic()) * 1000) + 1)
                topic, body = sock.recv_multipart()
                seen.append((topic.decode(), json.loads(body)))
                if seen[-1][0] == "plugin:started" and seen[-1][1]["pid"] != pid:
                    break
            topics = {t for t, _ in seen}
            assert "plugin:destroyed" in topics and "plugin:started" in topics
            destroyed = next(e for t, e in seen if t == "plugin:destroyed")
            assert (destroyed["pid"], destroyed["detail"]) == (pid, "SIGKILL")
            assert all(t.startswith("plugin:") for t in topics)  # the subscription filters
            assert all(e["type"] == t for t, e in seen)
        finally:
            sock.close()


def test_logfmt_logs_carry_plugin_and_instance() -> None:
    config = daemon_config(plugin_block("echo"), log_format="logfmt")
    with running_daemon(config) as d:
        d.call("echo", "say", {"text": "hello there"})
        d.wait_until(lambda: "hello there" in d.log.read_text(), what="the plugin line")
        lines = [ln for ln in d.log.read_text().splitlines() if "hello there" in ln]
        assert lines[0].startswith("ts=")
        assert 'msg="[echo/0] hello there"' in lines[0]
        assert "plugin=echo" in lines[0] and "instance=0" in lines[0]
        assert "level=info" in lines[0]


def test_oskctl_top_shows_calls_per_second() -> None:
    import subprocess
    import sys

    with running_daemon(daemon_config(plugin_block("echo"))) as d:
        for _ in range(20):
            d.call("echo", "echo", {"text": "x"})
        assert d.row("echo")["calls"] >= 20
        oskctl = [sys.executable, "-m", "osk_daemon.control.oskctl", "--socket", str(d.socket)]
        out = subprocess.run(
            [*oskctl, "top", "-n", "2", "--interval", "0.2"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        screens = out.split("osk-daemon top")
        assert len(screens) == 3  # two screens
        last = [ln for ln in screens[2].splitlines() if ln.startswith("echo")]
        assert last and last[0].split()[4] == "ready"


def test_prometheus_scrape_parses_and_counts() -> None:
    import re
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    body = plugin_block("echo") + '\n[metrics]\nlisten = "127.0.0.1:0"\n'
    with running_daemon(daemon_config(body)) as d:
        found = d.wait_until(
            lambda: re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", d.log.read_text()),
            what="the metrics listener",
        )
        url = f"http://127.0.0.1:{found.group(1)}/metrics"
        for _ in range(5):
            d.call("echo", "echo", {"text": "x"})
        with pytest.raises(Exception, match="no method"):
            d.call("echo", "nope")
        old_pid = d.row("echo")["pid"]
        os.kill(old_pid, signal.SIGKILL)

        def replaced() -> bool:
            row = d.row("echo")
            return row["state"] == "ready" and row["pid"] != old_pid and row["restarts"] == 1

        d.wait_until(replaced, what="echo restarted")
        with urllib.request.urlopen(url, timeout=10) as reply:
            assert reply.headers["Content-Type"].startswith("text/plain")
            text = reply.read().decode()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        up = families["osk_plugin_up"].samples
        assert [(s.labels["plugin"], s.value) for s in up] == [("echo", 1.0)]
        requests = {
            s.labels["outcome"]: s.value
            for s in families["osk_rpc_requests"].samples
            if s.labels["plugin"] == "echo" and s.name.endswith("_total")
        }
        assert requests["ok"] >= 5 and requests["error"] >= 1
        restarts = [s for s in families["osk_plugin_restarts"].samples if s.name.endswith("_total")]
        assert [(s.labels["reason"], s.value) for s in restarts] == [("signal", 1.0)]
        count = next(
            s.value
            for s in families["osk_rpc_duration_seconds"].samples
            if s.name.endswith("_count") and s.labels["plugin"] == "echo"
        )
        assert count >= 6
        health = {s.labels["health"]: s.value for s in families["osk_plugin_health"].samples}
        assert sum(health.values()) == 1.0
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(url.replace("/metrics", "/other"), timeout=10)
        assert info.value.code == 404
        info.value.close()


def test_one_call_is_one_trace_from_the_broker_into_the_plugin() -> None:
    body = plugin_block("echo") + '\n[tracing]\nexporter = "file"\nfile = "traces.jsonl"\n'
    with running_daemon(daemon_config(body)) as d:
        from osk_daemon.ipc.client import Client

        with Client(f"ipc://{d.runtime / 'broker.sock'}") as client:
            assert client.call("echo", "echo", {"text": "traced"})["text"] == "traced"
        traces = d.workdir / "traces.jsonl"

        def spans() -> list[dict]:
            if not traces.exists():
                return []
            return [json.loads(line) for line in traces.read_text().splitlines() if line]

        d.wait_until(
            lambda: {s["name"] for s in spans()} >= {"osk.rpc echo.echo", "osk.handle echo"},
            what="both spans written",
        )
        by_name = {s["name"]: s for s in spans()}
        daemon_span, plugin_span = by_name["osk.rpc echo.echo"], by_name["osk.handle echo"]
        assert plugin_span["trace_id"] == daemon_span["trace_id"]
        assert plugin_span["parent_id"] == daemon_span["span_id"]
        assert plugin_span["service"] == "echo" and daemon_span["service"] == "osk-daemon"
        assert daemon_span["attributes"]["osk.instance"] == "echo/0"
        assert plugin_span["pid"] == d.row("echo")["pid"]
        # a crash and its replacement: one restart span
        old = d.row("echo")["pid"]
        os.kill(old, signal.SIGKILL)
        d.wait_until(
            lambda: any(s["name"] == "osk.restart echo/0" for s in spans()),
            what="the restart span",
        )
        restart = next(s for s in spans() if s["name"] == "osk.restart echo/0")
        assert restart["attributes"]["osk.reason"] == "signal"
        assert restart["end_ns"] > restart["start_ns"]

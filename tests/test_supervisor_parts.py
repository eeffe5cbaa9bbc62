"""The supervisor's parts one at a time: restart delays, the worker spec, the
port reservation (real sockets), worker counts, exit descriptions."""

from __future__ import annotations

import logging
import os
import signal
import socket

import pytest

from bomstream.cli import _overrides, build_parser
from bomstream.config_load import load_config
from bomstream.logs import FIELDS, ProcessFields
from bomstream.supervisors import worker_count
from bomstream.supervisors.backoff import RestartBackoff
from bomstream.supervisors.handoff import HandoffError, WorkerSpec, read_spec
from bomstream.supervisors.listen import reserve_port
from bomstream.supervisors.worker_process import describe_exit, worker_env


def test_restart_delay_doubles_while_a_worker_keeps_dying_and_resets_once_it_stays_up() -> None:
    b = RestartBackoff(first_s=0.5, max_s=8.0, stable_after_s=30.0)
    assert [b.next_delay(uptime_s=1.0) for _ in range(7)] == [0.5, 1, 2, 4, 8, 8, 8]
    assert b.next_delay(uptime_s=30.0) == 0.5
    assert b.next_delay(uptime_s=2.0) == 1.0


def _spec() -> WorkerSpec:
    cfg = load_config(
        path=None,
        env={},
        default_file=False,
        overrides={
            "server.port": 43123,
            "server.workers": 3,
            "server.heartbeat_s": 2.5,
            "server.access_log": False,
            "redis.url": "redis://127.0.0.1:6390/2",
            "auth.admin_token": "s3cret-admin",
            "cors.allow_origins": ["https://a.example", "https://b.example"],
            "events.terminal_types": ["job.done"],
        },
    )
    return WorkerSpec(index=2, metrics_dir="/tmp/m", config=cfg)


def test_a_worker_spec_carries_the_whole_config_unchanged() -> None:
    spec = _spec()
    line = spec.encode()
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert WorkerSpec.decode(line) == spec


@pytest.mark.parametrize(
    "line",
    [b"", b"not json\n", b"[1, 2]\n", b'{"index": "0", "metrics_dir": "/m", "config": {}}\n'],
)
def test_a_garbled_spec_is_refused(line: bytes) -> None:
    with pytest.raises(HandoffError):
        WorkerSpec.decode(line)


def test_a_spec_whose_config_is_refused_names_the_key_not_the_secret() -> None:
    line = b'{"index": 0, "metrics_dir": "/m", "config": {"auth.admin_token": 918273645}}\n'
    with pytest.raises(HandoffError) as refused:
        WorkerSpec.decode(line)
    assert "auth.admin_token" in str(refused.value)
    assert "918273645" not in str(refused.value)


def test_reading_the_spec_stops_at_its_line_and_end_of_file_is_an_error() -> None:
    r, w = os.pipe()
    try:
        os.write(w, _spec().encode() + b"after")
        assert read_spec(r).index == 2
        assert os.read(r, 100) == b"after"
        os.close(w)
        w = -1
        with pytest.raises(HandoffError, match="closed the pipe"):
            read_spec(r)
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def test_workers_0_means_the_cpus_this_process_may_run_on() -> None:
    assert worker_count(0) == len(os.sched_getaffinity(0))
    assert worker_count(3) == 3


def _listener(port: int) -> socket.socket:
    """A worker's listener, made the way the event loop makes it."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", port))
    s.listen(64)
    return s


def test_the_reserved_port_takes_no_connections_but_workers_can_listen_on_it() -> None:
    r = reserve_port("127.0.0.1", 0)
    try:
        assert r.port > 0 and r.host == "127.0.0.1"
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", r.port), timeout=2).close()
        a, b = _listener(r.port), _listener(r.port)
        try:
            clients = [socket.create_connection(("127.0.0.1", r.port)) for _ in range(20)]
            accepted = 0
            for listener in (a, b):
                listener.setblocking(False)
                while True:
                    try:
                        listener.accept()[0].close()
                    except BlockingIOError:
                        break
                    accepted += 1
            assert accepted == len(clients)
            for c in clients:
                c.close()
        finally:
            a.close()
            b.close()
        # Every worker gone: the port is still held against a plain bind.
        with socket.socket() as other:
            other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            with pytest.raises(OSError):
                other.bind(("127.0.0.1", r.port))
    finally:
        r.close()


def test_a_port_already_listened_on_or_reserved_cannot_be_reserved() -> None:
    first = reserve_port("127.0.0.1", 0)
    try:
        with pytest.raises(OSError):
            reserve_port("127.0.0.1", first.port)
        # Even beside reuse-port listeners of the same user, which a plain
        # SO_REUSEPORT bind would join.
        worker = _listener(first.port)
        first.close()
        try:
            with pytest.raises(OSError):
                reserve_port("127.0.0.1", first.port)
        finally:
            worker.close()
    finally:
        first.close()


def test_exit_descriptions() -> None:
    assert describe_exit(0) == {"exit_code": 0}
    assert describe_exit(2) == {"exit_code": 2}
    assert describe_exit(-signal.SIGKILL) == {"signal": "SIGKILL"}


def test_workers_get_the_multiprocess_directory_and_no_bomstream_settings() -> None:
    env = worker_env({"PATH": "/bin", "BOMSTREAM_AUTH_ADMIN_TOKEN": "x"}, "/tmp/m")
    assert env == {"PATH": "/bin", "PROMETHEUS_MULTIPROC_DIR": "/tmp/m"}


def test_process_fields_follow_a_lines_own_fields() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "msg", None, None)
    setattr(record, FIELDS, {"bom_id": "b"})
    assert ProcessFields({"worker": 1}).filter(record)
    assert getattr(record, FIELDS) == {"bom_id": "b", "worker": 1}
    bare = logging.LogRecord("x", logging.INFO, __file__, 1, "msg", None, None)
    ProcessFields({"worker": 1}).filter(bare)
    assert getattr(bare, FIELDS) == {"worker": 1}


def test_only_serve_maps_workers_onto_server_workers() -> None:
    parser = build_parser()
    assert _overrides(parser.parse_args(["serve", "--workers", "3"]))["server.workers"] == 3
    load = parser.parse_args(["loadtest", "--workers", "2", "--connections", "10"])
    assert "server.workers" not in _overrides(load)

"""db_watch: a socket still registered when it is due is shut down by the watch thread (its peer reads
the end of the stream); one unregistered in time is never touched, even once its due time has passed."""
from __future__ import annotations

import socket
import time

from tests.support.waiting import wait_until
from yindian_common import db_watch


def test_a_socket_past_due_is_shut_and_one_unregistered_in_time_is_not() -> None:
    kept_a, kept_b = socket.socketpair()
    cut_a, cut_b = socket.socketpair()
    try:
        now = time.monotonic()
        token = db_watch.register(kept_a.fileno(), now + 0.05)
        db_watch.unregister(token)  # the call answered in time
        db_watch.register(cut_a.fileno(), now + 0.05)
        cut_b.settimeout(5.0)
        assert cut_b.recv(16) == b""  # shut down by the watch thread: the end of the stream
        wait_until(lambda: time.monotonic() > now + 0.05, "both due times passed")
        kept_a.sendall(b"still here")
        kept_b.settimeout(5.0)
        assert kept_b.recv(16) == b"still here"
    finally:
        for s in (kept_a, kept_b, cut_a, cut_b):
            s.close()

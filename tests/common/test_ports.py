"""yindian_common.ports: a server's port that a restart after kill -9 finds free."""
from __future__ import annotations

import random
import socket

from yindian_common.ports import ephemeral_low, stable_port


def test_the_port_is_below_the_range_outgoing_connections_draw_from_and_can_be_listened_on() -> None:
    for _ in range(20):
        port = stable_port()
        assert port < ephemeral_low()
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
            s.listen()


def test_a_port_someone_listens_on_is_never_returned() -> None:
    first = stable_port(rng=random.Random(7))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", first))
        taken.listen()
        again = stable_port(rng=random.Random(7))  # the same sequence: its first pick is the taken port
        assert again != first
        with socket.socket() as s:
            s.bind(("127.0.0.1", again))


def test_a_port_picked_for_another_server_not_started_yet_is_never_returned() -> None:
    first = stable_port(rng=random.Random(7))
    again = stable_port(rng=random.Random(7), exclude={first})  # the same sequence: its first pick is excluded
    assert again != first

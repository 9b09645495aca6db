"""send_all must retry until the broker acks, whether send() or its future fails."""

import asyncio

from stream.worker import send_all


class FlakyTopic:
    def __init__(self):
        self.calls = 0
        self.delivered: list[tuple[bytes | None, bytes]] = []

    async def send(self, key, value, force):
        assert force  # never attached to the event: must be on the broker before the ack
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("buffer full")
        future = asyncio.get_running_loop().create_future()
        if self.calls == 2:
            future.set_exception(ConnectionError("broker gone"))
        else:
            self.delivered.append((key, value))
            future.set_result("metadata")
        return future


def test_send_all_retries_both_kinds_of_failure_until_acked():
    topic = FlakyTopic()
    asyncio.run(send_all(topic, [("a", b"1"), ("b", b"2")], retry_s=0.01))
    assert sorted(topic.delivered) == [(b"a", b"1"), (b"b", b"2")]
    assert topic.calls == 4  # two failed attempts, then both records once

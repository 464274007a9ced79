"""A Grid that delivers messages to fedlora's real ClientApp in this process.

Flower's ``Grid`` is a small ABC; this one keeps a ``Context`` per node (so
``context.state`` persists between rounds, as Flower guarantees) and turns a
ClientApp exception into an error reply, as Flower's runtimes do. ``slow``
nodes never answer a train message: the round's timeout.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity


class LocalGrid(Grid):
    def __init__(self, client_app, run_config: dict, num_nodes: int, *, slow: set[int] = frozenset(), node_ids=None):
        self.client_app = client_app
        # What Flower's runtime sets in a ServerApp process before any Message is made.
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
        ids = node_ids or [1000 + 7 * i for i in range(num_nodes)]  # opaque ids, not partition ids
        self.contexts = {
            nid: Context(run_id=1, node_id=nid, node_config={"partition-id": i, "num-partitions": num_nodes},
                         state=RecordDict(), run_config=dict(run_config))
            for i, nid in enumerate(ids)
        }
        self.slow = set(slow)
        self.sent: list[Message] = []

    def set_run(self, run_id):  # noqa: D401 - Grid API
        pass

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for msg in messages:
            self.sent.append(msg)
            nid = msg.metadata.dst_node_id
            if nid in self.slow and msg.metadata.message_type == "train":
                continue
            try:
                replies.append(self.client_app(msg, self.contexts[nid]))
            except Exception as e:  # what Flower's runtime does with a ClientApp exception
                replies.append(Message(Error(code=3, reason=f"{type(e).__name__}: {e}"), reply_to=msg))
        return replies

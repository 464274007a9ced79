"""A Grid that delivers messages to fedlora's real ClientApp in this process.

Flower's ``Grid`` is a small ABC; this one keeps a ``Context`` per node (so
``context.state`` persists between rounds, as Flower guarantees) and turns a
ClientApp exception into an error reply, as Flower's runtimes do. ``slow``
nodes never answer a train message: the round's timeout. Each message gets an
id when it is sent, as Flower's Grids give it, and replies name it.
``restart`` gives a node a fresh context (its state lost), under the same id
or a new one, as a SuperNode restarted with or without authentication.
"""

from __future__ import annotations

import uuid
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
            nid: Context(run_id=1, node_id=nid, node_config={"partition-id": i, "num-partitions": num_nodes}, state=RecordDict(), run_config=dict(run_config))
            for i, nid in enumerate(ids)
        }
        self.slow = set(slow)
        self.offline: set[int] = set()
        self.sent: list[Message] = []

    def restart(self, node_id: int, new_id: int | None = None) -> int:
        """Node ``node_id`` restarts with empty state, as ``new_id`` if given (the old id goes offline)."""
        old = self.contexts.pop(node_id)
        nid = node_id if new_id is None else new_id
        self.contexts[nid] = Context(run_id=1, node_id=nid, node_config=dict(old.node_config), state=RecordDict(), run_config=dict(old.run_config))
        return nid

    def set_run(self, run_id):  # noqa: D401 - Grid API
        pass

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type)

    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self.contexts if n not in self.offline]

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # what Grid.push_messages does
            self.sent.append(msg)
            nid = msg.metadata.dst_node_id
            if nid in self.slow and msg.metadata.message_type == "train":
                continue
            if nid not in self.contexts or nid in self.offline:  # the SuperLink answers for a node that is gone
                replies.append(Message(Error(code=4, reason="NODE_UNAVAILABLE"), reply_to=msg))
                continue
            try:
                replies.append(self.client_app(msg, self.contexts[nid]))
            except Exception as e:  # what Flower's runtime does with a ClientApp exception
                replies.append(Message(Error(code=3, reason=f"{type(e).__name__}: {e}"), reply_to=msg))
        return replies

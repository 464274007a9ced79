"""A Grid that delivers messages to fedlora's real ClientApp in this process.

Flower's ``Grid`` is a small ABC; this one keeps a ``Context`` per node (so
``context.state`` persists between rounds, as Flower guarantees) and turns a
ClientApp exception into an error reply, as Flower's runtimes do. Each message
gets an id when it is pushed, as Flower's Grids give it, and replies name it.

* ``slow`` nodes never answer a train message: the round's timeout.
* ``mute`` nodes are online but answer nothing (crashed; the SuperLink has not
  noticed yet).
* A message to a node that is gone is answered by "the SuperLink": Flower's own
  error reply, from node 0, not from the node.
* ``restart`` gives a node a fresh context (its state lost), under the same id
  or a new one, as a SuperNode restarted with or without authentication.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message
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
        self.mute: set[int] = set()
        self.sent: list[Message] = []
        self._outbox: dict[str, Message] = {}  # message id → its reply, until pulled

    def restart(self, node_id: int, new_id: int | None = None, *, old_stays_online: bool = False) -> int:
        """Node ``node_id`` restarts with empty state, as ``new_id`` if given. The old id goes
        offline, or stays listed but mute (a crash the SuperLink has not noticed yet)."""
        old = self.contexts[node_id] if old_stays_online else self.contexts.pop(node_id)
        if old_stays_online:
            self.mute.add(node_id)
        nid = node_id if new_id is None else new_id
        self.contexts[nid] = Context(run_id=1, node_id=nid, node_config=dict(old.node_config), state=RecordDict(), run_config=dict(old.run_config))
        return nid

    def set_run(self, run_id):
        pass

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # what Grid.push_messages does
            self.sent.append(msg)
            ids.append(msg.metadata.message_id)
            reply = self._deliver(msg)
            if reply is not None:
                self._outbox[msg.metadata.message_id] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self._outbox.pop(i) for i in list(message_ids) if i in self._outbox]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))

    def _deliver(self, msg: Message) -> Message | None:
        nid = msg.metadata.dst_node_id
        if nid in self.mute or (nid in self.slow and msg.metadata.message_type == "train"):
            return None
        if nid not in self.contexts:  # what the SuperLink answers for a node that went offline
            return create_message_error_unavailable_res_message(msg.metadata, "node_unavail")
        try:
            return self.client_app(msg, self.contexts[nid])
        except Exception as e:  # noqa: BLE001 - what Flower's runtime does with a ClientApp exception
            return Message(Error(code=3, reason=f"{type(e).__name__}: {e}"), reply_to=msg)

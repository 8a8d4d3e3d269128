"""An in-process stand-in for Flower's Grid: messages go straight to ``ClientApp`` s.

Each node keeps its own ``Context`` (node config and persistent state) as a SuperNode does; a
node's ClientApp can be wrapped to tamper with its replies. ``compilation_cache``: JAX's
persistent compilation cache in a folder for a while, so that a program the simulation compiled
is loaded, not compiled again, by the deployment (another process, or the sites' own jitted
functions in this one).
"""

from __future__ import annotations

import contextlib
import itertools

import jax
import pytest

flwr = pytest.importorskip("flwr")
from flwr.app import Context, Message, RecordDict  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

SERVER_NODE = 0


class LocalGrid(Grid):
    """Routes every message to the node's app and returns its reply (no network)."""

    def __init__(self, nodes):
        # nodes: node_id -> (client_app, node_config)
        self.nodes = dict(nodes)
        self.contexts = {
            n: Context(run_id=1, node_id=n, node_config=cfg, state=RecordDict(), run_config={})
            for n, (_, cfg) in self.nodes.items()
        }
        self._ids = itertools.count(1)
        self._run = None
        self._replies = {}
        # The identity a ServerApp process has under the deployment runtime.
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SERVER_NODE, 1

    def set_run(self, run):
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id, message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        """Delivers each message to its node's app at once; the replies wait to be pulled."""
        ids = []
        for message in messages:
            message_id = f"m{next(self._ids)}"
            message.metadata.__dict__["_message_id"] = message_id
            node = message.metadata.dst_node_id
            app, _ = self.nodes[node]
            self._replies[message_id] = app(message, self.contexts[node])
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids):
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))


@pytest.fixture(scope="session")
def local_grid():
    """The :class:`LocalGrid` class (test modules cannot import conftest by name)."""
    return LocalGrid


@contextlib.contextmanager
def _compilation_cache(folder: str):
    """This process's JAX with its persistent compilation cache in ``folder``, then as before."""
    from jax._src import compilation_cache  # JAX sets its cache up once; tests reset it

    from fedjax_med.deploy import runtime

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    names += ("jax_persistent_cache_min_entry_size_bytes",)
    saved = {name: getattr(jax.config, name) for name in names}
    compilation_cache.reset_cache()
    runtime.use_compilation_cache(folder)
    try:
        yield
    finally:
        for name, value in saved.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()


@pytest.fixture(scope="session")
def compilation_cache():
    """The context manager ``compilation_cache(folder)`` (see the module docstring)."""
    return _compilation_cache


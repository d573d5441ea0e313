"""pytest plugin (entry point ``pytest11: weavelet``): fixtures for weavelet and its plugin authors.

- ``nats_server`` / ``redis_server``: real servers on free loopback ports, started once per session.
- ``nats_server_factory`` / ``redis_server_factory``: start private servers (for outage tests: stop, kill,
  restart on the same port).
"""

from weavelet_core.testing.nats import *  # noqa: F403
from weavelet_core.testing.redis import *  # noqa: F403

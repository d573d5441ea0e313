"""pytest plugin of weavelet's core (entry point ``pytest11: weavelet``).

It provides no fixtures of its own: each transport registers its test-server fixtures through its own entry
point (``weavelet_nats.testing``, ``weavelet_redis.testing``), named with a ``weavelet_`` prefix, so the core
names no transport and a user's pytest session gets no generic fixture names from weavelet.
"""

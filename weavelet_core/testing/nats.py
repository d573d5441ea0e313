"""Real nats-server fixtures (being written)."""

__all__: list[str] = []

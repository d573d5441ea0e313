"""Real redis-server fixtures (being written)."""

__all__: list[str] = []

"""Placeholder: real redis-server fixtures land here."""

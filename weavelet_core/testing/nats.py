"""Placeholder: real nats-server fixtures land here."""

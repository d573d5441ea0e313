"""``nats://`` transport for weavelet: desired config, status and outcomes in JetStream key-value buckets.

The transport itself lives in :mod:`weavelet_nats.transport` (it needs nats-py, ``pip install
"weavelet[nats]"``); :mod:`weavelet_nats.embedded` runs a local nats-server, :mod:`weavelet_nats.server` is the
``weavelet server`` command. Importing this package imports none of them.
"""

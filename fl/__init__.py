"""Federated-learning core: data, partitions, models, local training, aggregation and the round loop.

Imports nothing from the project: no ledger, no network."""

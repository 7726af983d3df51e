"""Node roles, the vocabulary shared by builders, files, validation and the node runtime.

Why strings and not an enum: roles are written into GraphML, JSON and edge-list files that
people edit by hand, so the value in memory is exactly the value in the file.
"""

from __future__ import annotations

CLIENT = "client"
"""A data node that trains and gossips (with its neighbours, or with its aggregator only)."""

AGGREGATOR = "aggregator"
"""A data node that also averages its member clients and gossips with other aggregators."""

AGGREGATOR_ONLY = "aggregator-only"
"""An extra node with no data: it only averages (an edge server, or the FedAvg hub)."""

ROLES = (CLIENT, AGGREGATOR, AGGREGATOR_ONLY)

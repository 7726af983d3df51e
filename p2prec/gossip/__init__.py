"""Gossip: mixing weights and rules, shared by the simulator and the real node."""

"""The real node: one process per topology node, gossiping the shared adapter over ZeroMQ.

``p2prec-node --config node/example.toml --id N`` runs node N of the topology file named by
``gossip.topology``. The modules, one job each: :mod:`~p2prec.node.place` (role, peers and
mixing weights from the topology), :mod:`~p2prec.node.learner` (the simulator's local
update for this node's users), :mod:`~p2prec.node.transport` (sockets),
:mod:`~p2prec.node.inbox` (messages by round, deadlines), :mod:`~p2prec.node.protocol`
(one round per role) and :mod:`~p2prec.node.runtime` (the node's life: greet, rounds, persist, stop on a signal).
Its crash-safe state is a :mod:`p2prec.run.checkpoint`, the format serving also reads.
"""

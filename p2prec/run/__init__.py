"""What every run shares, whichever engine runs it: its data set and nodes, and the files it leaves.

Why a room of its own, below the simulator and the real node: both (and the launcher
that starts real nodes, and serving) must agree on which users form which node and on
the files a run leaves behind, and neither may import the other. :mod:`~p2prec.run.data`
loads the configured data set and picks the run's nodes; :mod:`~p2prec.run.folder` is
the output contract (``config.toml``, ``metrics.jsonl``, ``summary.json``) and
:mod:`~p2prec.run.plots` draws its ``convergence.png``; :mod:`~p2prec.run.checkpoint` is
a node's saved state, which real nodes write, the simulator saves for serving, and
serving reads.
"""

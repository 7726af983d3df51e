"""Serving: a user's top-k unseen items from a node's state folder (``p2prec recommend``).

:mod:`p2prec.serve.state` defines and writes the state folder; :mod:`p2prec.serve.recommend`
reads it and answers. Nothing is imported here, so ``p2prec`` starts without loading the model.
"""

"""Metropolis–Hastings mixing weights and the convergence speed they promise.

Why Metropolis–Hastings: it needs only each node's and its neighbours' degrees (no global
knowledge), and on an undirected graph it is symmetric and doubly stochastic, so repeated
averaging ``x <- W x`` keeps the network mean and converges to it. The second-largest
eigenvalue modulus of ``W`` is the factor by which the distance to consensus shrinks per
round; one minus it, the spectral gap, is the number to report next to a topology.
"""

from __future__ import annotations

import networkx as nx
import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from p2prec.topology.errors import TopologyError

DENSE_UP_TO = 3000
"""Largest matrix whose spectrum is computed densely; above it, ARPACK finds the top two.
ARPACK is quick when the gap is not tiny (0.1 s for a 5000-node small world) but slow when
eigenvalues crowd near 1 (about 40 s for a 5000-node ring)."""


def metropolis_hastings(graph: nx.Graph) -> sp.csr_matrix:
    """``W_ij = 1 / (1 + max(deg_i, deg_j))`` on edges, ``W_ii = 1 - sum_j W_ij``.

    Row ``i`` is node ``i``, so node ids must be ``0..N-1``. Self-loops are ignored: the
    diagonal already gives every node its own weight.
    """
    if graph.is_directed():
        raise TopologyError("Metropolis-Hastings weights need an undirected topology")
    n = graph.number_of_nodes()
    if set(graph.nodes) != set(range(n)):
        raise TopologyError(f"mixing needs node ids 0..{n - 1} with none missing; renumber the topology")
    edges = np.array([(u, v) for u, v in graph.edges if u != v], dtype=np.int64).reshape(-1, 2)
    degree = np.zeros(n)
    np.add.at(degree, edges.ravel(), 1.0)
    weight = 1.0 / (1.0 + np.maximum(degree[edges[:, 0]], degree[edges[:, 1]]))
    rows = np.concatenate([edges[:, 0], edges[:, 1]])
    cols = np.concatenate([edges[:, 1], edges[:, 0]])
    off = sp.coo_matrix((np.concatenate([weight, weight]), (rows, cols)), shape=(n, n)).tocsr()
    diagonal = 1.0 - np.asarray(off.sum(axis=1)).ravel()
    return (off + sp.diags(diagonal)).tocsr()


def predicted_rate(w: sp.spmatrix | np.ndarray) -> float:
    """Second-largest eigenvalue modulus: the per-round contraction of ``||x_t - mean||``."""
    n = w.shape[0]
    if n == 1:
        return 0.0
    symmetric = abs(w - w.T).max() <= 1e-12
    if n <= DENSE_UP_TO:
        dense = w.toarray() if sp.issparse(w) else np.asarray(w)
        values = np.linalg.eigvalsh(dense) if symmetric else np.linalg.eigvals(dense)
    else:
        solve = spla.eigsh if symmetric else spla.eigs
        values = solve(sp.csr_matrix(w), k=2, which="LM", return_eigenvectors=False)
    moduli = np.sort(np.abs(values))[::-1]
    return float(moduli[1])


def spectral_gap(w: sp.spmatrix | np.ndarray) -> float:
    """``1 - predicted_rate(w)``: 1 for the complete graph, near 0 for a long ring."""
    return 1.0 - predicted_rate(w)

"""CurveZMQ security for real nodes: keypairs on disk, an allow-list of peers, secured sockets.

Why CurveZMQ with a ZAP allow-list: Curve encrypts and authenticates every connection
with the peers' long-term keys, and ZAP lets the node decide, per connecting key, whether
to talk at all. The topology file lists every node's public key (node attribute ``key``);
a node's allow-list is its neighbours' keys among them, so a stranger's connection, or a
listed node's that is not a neighbour, is refused during the handshake, before a single
message reaches the node, and a plaintext peer cannot even complete the handshake. Each
refusal is reported with its reason (``report``), for the node to count and log.

Keys on disk use ZeroMQ's certificate format (what ``zmq.auth.create_certificates``
writes, so other ZeroMQ tools read them): ``NAME.key`` holds the public key and
``NAME.key_secret`` both keys. Both go through :func:`p2prec.atomic.write_text_atomic`,
whose temporary file is created with mode 0600 before any byte is written, so a secret is
never readable by others even for an instant; secret files keep 0600 and are refused at
load time if their mode lets others read them.

Security is never optional once asked for: every function here raises
:class:`SecurityError`, one line naming the file or node, rather than fall back to
plaintext. A node with ``security.enabled`` calls :func:`node_keys` and then, on its
zmq context, :class:`CurveSecurity`::

    keys = node_keys(cfg.security, node_id, graph)        # SecurityError if anything is missing
    with CurveSecurity(ctx, keys.keypair, keys.peers.values()) as curve:
        curve.serve(router)                               # before router.bind(...)
        curve.dial(dealer, keys.peers[neighbour])         # before dealer.connect(...)
        ...
        sender = sender_of(frames[-1], keys.peers)        # who really sent a received message
"""

from __future__ import annotations

import datetime
import re
import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import networkx as nx
import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from p2prec.atomic import write_text_atomic

if TYPE_CHECKING:
    from p2prec.config import SecurityConfig

PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}")


class SecurityError(ValueError):
    """Security is configured but cannot be honoured; the message names the file, key or node.

    A ValueError, so the CLIs report it as one line like any other bad setting."""


@dataclass(frozen=True)
class Keypair:
    """A Curve keypair, both keys Z85-encoded (40 ASCII bytes)."""

    public: bytes
    secret: bytes


@dataclass(frozen=True)
class NodeKeys:
    """What a secured node needs: its own keypair and every other topology node's public key.

    The node's transport takes its neighbours' among ``peers`` as the allow-list of its
    server socket and as the server key of each neighbour it dials; the rest only name
    refused keys in the log.
    """

    keypair: Keypair
    peers: dict[int, bytes]


def key_name(node: int) -> str:
    """The file name stem of a node's keys: ``node7`` for node 7."""
    return f"node{node}"


def check_key(key: bytes | str, what: str) -> bytes:
    """A Z85 Curve key as bytes; :class:`SecurityError` naming ``what`` if it is not one."""
    raw = key.encode("ascii", "replace") if isinstance(key, str) else bytes(key)
    try:
        valid = len(raw) == 40 and len(z85.decode(raw)) == 32
    except (ValueError, KeyError, IndexError):
        valid = False
    if not valid:
        raise SecurityError(f"{what} is not a Z85-encoded Curve key (40 characters)")
    return raw


def _certificate(public: bytes, secret: bytes | None) -> str:
    """ZeroMQ's certificate text (the format ``zmq.auth.load_certificate`` reads)."""
    kind = "Secret" if secret else "Public"
    lines = [f"#   ****  Generated on {datetime.datetime.now():%Y-%m-%d %H:%M:%S} by p2prec  ****",
             f"#   ZeroMQ CURVE {kind} Certificate", "", "metadata", "curve",
             f'    public-key = "{public.decode()}"']
    if secret:
        lines.append(f'    secret-key = "{secret.decode()}"')
    return "\n".join(lines) + "\n"


def generate_keys(out_dir: str | Path, names: Iterable[str]) -> dict[str, bytes]:
    """Write a new keypair per name, ``NAME.key`` (0644) and ``NAME.key_secret`` (0600).

    Refuses to overwrite existing keys: replacing a node's secret locks it out of a
    network whose topology lists the old public key. Returns name -> public key.
    """
    folder = Path(out_dir)
    names = list(names)
    for name in names:
        if not _NAME.fullmatch(name):
            raise SecurityError(f"key name {name!r} must be letters, digits, '_', '-' or '.' (at most 64)")
    if len(set(names)) != len(names):
        raise SecurityError("key names must be distinct")
    existing = [str(folder / (n + s)) for n in names for s in (PUBLIC_SUFFIX, SECRET_SUFFIX)
                if (folder / (n + s)).exists()]
    if existing:
        raise SecurityError(f"refusing to overwrite existing key file {existing[0]}")
    folder.mkdir(parents=True, exist_ok=True)
    publics: dict[str, bytes] = {}
    for name in names:
        public, secret = zmq.curve_keypair()
        write_text_atomic(folder / (name + SECRET_SUFFIX), _certificate(public, secret), 0o600)
        write_text_atomic(folder / (name + PUBLIC_SUFFIX), _certificate(public, None), 0o644)
        publics[name] = public
    return publics


def _load(path: Path) -> tuple[bytes, bytes | None]:
    if not path.is_file():
        raise SecurityError(f"key file {path} does not exist")
    try:
        return zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise SecurityError(f"key file {path} is not a ZeroMQ certificate: {exc}") from None


def load_public_key(path: str | Path) -> bytes:
    """The public key of a ``.key`` (or ``.key_secret``) file."""
    public, _ = _load(Path(path))
    return check_key(public, f"public key in {path}")


def load_keypair(secret_path: str | Path) -> Keypair:
    """A keypair from a ``.key_secret`` file that only its owner can read, its halves matching."""
    path = Path(secret_path)
    public, secret = _load(path)
    if secret is None:
        raise SecurityError(f"key file {path} holds no secret key")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise SecurityError(f"secret key file {path} is accessible by others (mode {mode:04o}); chmod 600 it")
    keypair = Keypair(check_key(public, f"public key in {path}"), check_key(secret, f"secret key in {path}"))
    if zmq.curve_public(keypair.secret) != keypair.public:
        raise SecurityError(f"key file {path}: the public key does not belong to the secret key")
    return keypair


def topology_keys(graph: nx.Graph) -> dict[int, bytes]:
    """Every node's public key from its ``key`` attribute; all must be present and valid."""
    keys: dict[int, bytes] = {}
    for node, attrs in graph.nodes(data=True):
        if not attrs.get("key"):
            raise SecurityError(f"topology node {node} has no 'key' attribute; a secured network lists every key")
        keys[int(node)] = check_key(attrs["key"], f"topology node {node}'s key")
    return keys


def secret_key_path(security: SecurityConfig, node: int) -> Path:
    """``security.secret_key`` if set, else ``security.key_dir/node<id>.key_secret``."""
    if security.secret_key:
        return Path(security.secret_key)
    if security.key_dir:
        return Path(security.key_dir) / (key_name(node) + SECRET_SUFFIX)
    raise SecurityError("security is enabled but neither security.secret_key nor security.key_dir is set")


def node_keys(security: SecurityConfig, node: int, graph: nx.Graph) -> NodeKeys:
    """Node ``node``'s keypair and its peers' keys, or :class:`SecurityError`; never plaintext."""
    keypair = load_keypair(secret_key_path(security, node))
    keys = topology_keys(graph)
    if node not in keys:
        raise SecurityError(f"node {node} is not in the topology")
    if keys[node] != keypair.public:
        raise SecurityError(f"node {node}'s secret key does not match its public key in the topology")
    return NodeKeys(keypair, {peer: key for peer, key in keys.items() if peer != node})


class _AllowList:
    """The ZAP credentials callback: admits exactly the Z85 client keys given, and reports
    every key it refuses, naming its node when ``others`` (e.g. the whole topology) lists it."""

    def __init__(self, keys: Iterable[bytes], others: Mapping[int, bytes] | None = None,
                 report: Callable[[int | str, str, str], None] | None = None) -> None:
        self.keys = frozenset(check_key(key, "allow-list key") for key in keys)
        self.owners = {key: node for node, key in (others or {}).items()}
        self.report = report

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.keys:
            return True
        if self.report is not None:
            node = self.owners.get(key)
            if node is None:
                self.report("an unknown connection", "a handshake with a key not on the allow-list",
                            f"key {key.decode('ascii', 'replace')[:8]}... is not a neighbour's")
            else:
                self.report(node, "a handshake from a listed node that is not a neighbour",
                            "only a node's neighbours may connect to it")
        return False


class CurveSecurity:
    """A zmq context's Curve setup: this node's keypair and a ZAP handler admitting only ``allowed``.

    Use as a context manager (or :meth:`start` / :meth:`stop`) around the sockets' life:
    the ZAP handler must run before a server socket binds, because libzmq admits every
    Curve client when no handler is present. The handler runs in a thread (pyzmq's
    ``ThreadAuthenticator``), so it serves plain and asyncio contexts alike. One per context.
    """

    def __init__(self, context: zmq.Context, keypair: Keypair, allowed: Iterable[bytes], *,
                 others: Mapping[int, bytes] | None = None,
                 report: Callable[[int | str, str, str], None] | None = None) -> None:
        self.keypair = keypair
        self._auth = ThreadAuthenticator(context)
        self._auth.configure_curve_callback("*", _AllowList(allowed, others, report))

    def start(self) -> None:
        self._auth.start()

    def stop(self) -> None:
        self._auth.stop()

    def __enter__(self) -> CurveSecurity:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def serve(self, sock: zmq.Socket) -> None:
        """Make ``sock`` (the node's ROUTER) a Curve server; call before it binds."""
        if not self._auth.is_alive():
            raise SecurityError("the ZAP allow-list is not running: start CurveSecurity before serving")
        sock.curve_secretkey = self.keypair.secret
        sock.curve_publickey = self.keypair.public
        sock.curve_server = True

    def dial(self, sock: zmq.Socket, server_key: bytes) -> None:
        """Make ``sock`` (a DEALER) a Curve client of the server with ``server_key``; call before it connects."""
        sock.curve_secretkey = self.keypair.secret
        sock.curve_publickey = self.keypair.public
        sock.curve_serverkey = check_key(server_key, "server key")


def sender_of(frame: zmq.Frame, peers: Mapping[int, bytes]) -> int:
    """The node whose key authenticated the connection a frame came in on (received with ``copy=False``).

    Compare it with the message header's sender, which the peer merely claims.
    """
    try:
        key = frame.get("User-Id").encode("ascii")
    except zmq.ZMQError:
        raise SecurityError("a frame arrived without an authenticated Curve key") from None
    for node, peer_key in peers.items():
        if peer_key == key:
            return node
    raise SecurityError("a frame arrived from a key that is not on the allow-list")

#!/usr/bin/env python3
"""Write the seed corpus of the tunnel_session fuzz target.

The input layout is documented at the top of fuzz_targets/tunnel_session.rs:
six setup bytes, then operations (one byte: bits 0-3 opcode, bit 4 side,
bits 5-7 stream index k; arguments follow). Run from fuzz/:

    python3 scripts/tunnel_session_seeds.py

and check what a seed does with
`TUNNEL_SESSION_TRACE=1 cargo +nightly fuzz run tunnel_session corpus/tunnel_session/<seed> -- -runs=1`.
"""
import os

S, A = 0, 1  # sides


def settings(window=2, max_data=2, max_window=2, link_window=2, streams=3,
             quarantine=1, heartbeat_slow=False, handshake_long=True, small_frames=False):
    a = window | max_data << 2 | max_window << 4 | link_window << 6
    b = (streams | quarantine << 3 | heartbeat_slow << 5 | handshake_long << 6
         | small_frames << 7)
    return [a, b]


def setup(server=None, agent=None, service_token=False, agent_token=0,
          extensions=True, name=0, seed=0x42):
    hs = int(service_token) | agent_token << 1 | int(extensions) << 3 | name << 4
    return (server or settings()) + (agent or settings()) + [hs, seed]


def op(code, x=S, k=0, *args):
    return [code | x << 4 | k << 5, *args]


def pump(x, n=0): return op(0, x, 0, n)
def start(): return op(1, A)
def open_(p=7, k=0): return op(2, S, k, p)  # k = 7: 256 clients
def data(x, k=0, length=255, q=0): return op(3, x, k, length, q)
def drain(x, k=0, a=0): return op(4, x, k, a)
def eof(x, k=0): return op(5, x, k)
def closed(x, k=0): return op(6, x, k)
def time(t): return op(7, S, 0, t)
def drained(x): return op(8, x)
def mode(x, m): return op(9, x, 0, m)
def frame(to, c, id_, *rest): return op(10, to, 0, c, id_, *rest)
def raw(to, bs): return op(11, to, 0, len(bs), *bs)
def stale(x, kind, id_): return op(12, x, 0, kind, id_)
def down(x=S, graceful=True): return op(13, x, int(graceful))
def timer(x): return op(14, x)
def settle(): return op(15)


SLOW = 1

seeds = {
    # Base protocol: empty LISTEN, a stream each way, close.
    "base": setup(extensions=False) + start() + settle() + open_(1) + settle()
    + data(S) + data(A) + settle() + eof(S) + closed(S) + settle() + time(20),
    # Extended, no token: HELLO + READY, two streams, data both ways, half-close,
    # heartbeat.
    "extended": setup() + start() + settle() + open_(2) + open_(3) + settle()
    + data(S, 0) + data(S, 1) + data(A, 0) + data(A, 1, 100) + settle()
    + eof(S, 0) + settle() + eof(A, 0) + settle() + closed(S, 0) + closed(A, 0)
    + settle() + time(15) + settle(),
    # A token on both sides: AUTH, READY with the server's tag.
    "auth": setup(service_token=True, agent_token=1) + start() + settle()
    + open_(4) + settle() + data(S) + settle() + data(A) + settle(),
    # A wrong token: AUTH fails, REJECT; a second link whose handshake times
    # out (the agent's AUTH never reaches the server).
    "auth_wrong_reconnect": setup(service_token=True, agent_token=2) + start() + settle()
    + down() + start() + pump(A) + time(250),
    # CREDIT with slow sockets on the agent: the server's stream spends its
    # credit, the agent's drains grant WINDOW and grow the window.
    "credit_slow": setup(server=settings(window=1, max_data=2), agent=settings(window=1, max_data=2))
    + mode(A, SLOW) + start() + settle() + open_(5) + settle()
    + data(S) + data(S) + settle() + drain(A) + settle() + data(S) + data(S) + settle()
    + drain(A) + settle() + data(S) + settle() + drain(A) + settle(),
    # Base rule: a slow agent socket over its window pauses the link until it
    # drains.
    "base_pause": setup(extensions=False, server=settings(window=0, max_data=1),
                        agent=settings(window=0, max_data=1))
    + mode(A, SLOW) + start() + settle() + open_(6) + settle()
    + data(S) + data(S) + data(S) + settle() + drain(A) + settle(),
    # Base mode, every id in use: one closed and quarantined, a client
    # refused, then the quarantine ends and the id is used again.
    "ids_quarantine": setup(extensions=False, server=settings(streams=7, quarantine=3),
                            agent=settings(streams=7))
    + start() + settle() + open_(0, k=7) + settle() + closed(S, 0) + open_(9)
    + time(208) + open_(10) + settle(),
    # Hostile frames on an up extended link: a CONNECT for an open id (to the
    # agent), an unknown command, a WINDOW that overflows the credit (to the
    # server).
    "hostile": setup() + start() + settle() + open_(8) + settle() + data(A) + settle()
    + frame(A, 0x80, 0, 2, 0) + frame(A, 0x0f, 9, 2, 1, 2)
    + frame(S, 0x8a, 0, 0xff, 0xff, 0xff, 0xff) + settle(),
}

out = os.path.join(os.path.dirname(__file__), "..", "corpus", "tunnel_session")
os.makedirs(out, exist_ok=True)
# Regression seeds (regress-*, inputs that found a bug) are kept as found.
for name in os.listdir(out):
    if not name.startswith("regress-"):
        os.remove(os.path.join(out, name))
for name, bs in seeds.items():
    with open(os.path.join(out, name), "wb") as f:
        f.write(bytes(bs))
    print(f"{name}: {len(bs)} bytes")

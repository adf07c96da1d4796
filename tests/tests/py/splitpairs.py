"""A parent and its child holding the two ends of Unix socketpairs split
after the fork (stream, seqpacket, datagram), and a client in the child of
the parent's named listener (one connection accepted, one pending). Each
side queues bytes or messages for the other, prints "ready", and waits for
DIR/go; then each drains what waits for it, and both talk both ways once
more. Results go to DIR/parent and DIR/child; then each queues a little more
for a second snapshot and restore, drained after DIR/go2 into DIR/parent2
and DIR/child2."""

import os
import socket
import sys
import time

DIR = sys.argv[1]
P2C = b"p2c-" * 3000
C2P = b"c2p-" * 3000


def at(name):
    return os.path.join(DIR, name)


def mark(name, text=""):
    with open(at(name + ".tmp"), "w") as f:
        f.write(text)
    os.rename(at(name + ".tmp"), at(name))


def wait(name):
    while not os.path.exists(at(name)):
        time.sleep(0.02)


def drain(s):
    s.setblocking(False)
    out = b""
    while True:
        try:
            chunk = s.recv(65536)
        except BlockingIOError:
            break
        if not chunk:
            out += b"<EOF>"
            break
        out += chunk
    s.setblocking(True)
    return out


def messages(s):
    s.setblocking(False)
    out = []
    while True:
        try:
            out.append(s.recv(65536).decode())
        except BlockingIOError:
            break
    s.setblocking(True)
    return ",".join(out)


def shown(got, want):
    return "ok" if got == want else f"bad({len(got)}:{got[:40]!r})"


def second_round(stream, seqpacket, me, other):
    """Bytes and a message queued again for a second snapshot, of the
    restored tree, once the other side has read all of the first round (a
    stream would join them); drained after DIR/go2 into DIR/<me>2."""
    wait(other)
    stream.sendall(b"again-from-" + me.encode())
    seqpacket.send(b"m-" + me.encode())
    mark(me + "-again")
    wait("go2")
    mark(me + "2", drain(stream).decode() + " " + messages(seqpacket))
    while True:
        time.sleep(1)


def connect():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect("split.sock")
    return s


a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
c, e = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
f, g = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind("split.sock")
listener.listen(4)

if os.fork() == 0:
    a.close()
    c.close()
    f.close()
    listener.close()
    client = connect()
    wait("accepted")
    pending = connect()
    b.sendall(C2P)
    e.send(b"c1")
    e.send(b"c2")
    g.send(b"d1")
    g.send(b"d2")
    client.sendall(b"client-bytes")
    mark("child-ready")
    wait("go")
    got = [shown(drain(b), P2C), messages(e), messages(g), drain(client).decode()]
    mark("child-drained")
    wait("parent-drained")
    b.sendall(b"child-after")
    e.send(b"c3")
    g.send(b"d3")
    client.sendall(b"client-after")
    pending.sendall(b"pending-after")
    for s in (b, e, g, client, pending):
        got.append(s.recv(100).decode())
    mark("child", " ".join(got))
    second_round(b, e, "child", "parent")
else:
    b.close()
    e.close()
    g.close()
    server, _ = listener.accept()
    mark("accepted")
    a.sendall(P2C)
    c.send(b"p1")
    c.send(b"p2")
    f.send(b"q1")
    f.send(b"q2")
    server.sendall(b"server-bytes")
    wait("child-ready")
    print("ready", flush=True)
    wait("go")
    got = [shown(drain(a), C2P), messages(c), messages(f), drain(server).decode()]
    mark("parent-drained")
    wait("child-drained")
    late, _ = listener.accept()
    a.sendall(b"parent-after")
    c.send(b"p3")
    f.send(b"q3")
    server.sendall(b"server-after")
    late.sendall(b"accepted-after")
    for s in (a, c, f, server, late):
        got.append(s.recv(100).decode())
    mark("parent", " ".join(got))
    second_round(a, c, "parent", "child")

"""What a supervised program sees of its sockets, printed line by line.

serve NAME PORT HOST...  listen on HOST:PORT for each HOST (IPv6 hosts
                         dual-stack); print "LISTEN <getsockname>" for each,
                         or "BIND-FAILED <errno name> after <ms> ms" and exit
                         3; answer every connection with
                         "NAME ACCEPTED <getsockname of the accepted socket>".
connect PORT HOST...     connect to HOST:PORT for each HOST; print
                         "PEER <getpeername>" and "REPLY <first line>".
"""

import errno
import selectors
import socket
import sys
import time


def show(addr):
    return f"{addr[0]} {addr[1]}"


def family(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def serve(name, port, hosts):
    sel = selectors.DefaultSelector()
    for host in hosts:
        s = socket.socket(family(host), socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if s.family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        start = time.monotonic()
        try:
            s.bind((host, port))
        except OSError as e:
            ms = int((time.monotonic() - start) * 1000)
            print(f"BIND-FAILED {errno.errorcode.get(e.errno, e.errno)} after {ms} ms", flush=True)
            sys.exit(3)
        s.listen(64)
        print("LISTEN", show(s.getsockname()), flush=True)
        sel.register(s, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select():
            conn, _ = key.fileobj.accept()
            with conn:
                conn.sendall(f"{name} ACCEPTED {show(conn.getsockname())}\n".encode())


def connect(port, hosts):
    for host in hosts:
        with socket.create_connection((host, port), timeout=5) as s:
            print("PEER", show(s.getpeername()), flush=True)
            print("REPLY", s.makefile().readline().strip(), flush=True)


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "serve":
        serve(args[0], int(args[1]), args[2:])
    elif mode == "connect":
        connect(int(args[0]), args[1:])
    else:
        sys.exit(f"unknown mode {mode}")

"""Socket calls whose outcome depends on who makes them, each printed as
one line `ok …` or the errno's name, so a test can compare a run under
appshot with the same run done natively.

    credprobe.py connect PATH            connect to a Unix socket, read a line
    credprobe.py bind PATH UMASK         bind a Unix socket under that umask,
                                         show owner and mode, then chmod it
    credprobe.py unspec PORT [serve]     bind 0.0.0.0:PORT given as AF_UNSPEC
                                         (the kernel takes it as AF_INET);
                                         with `serve`, answer `squatter`
"""
import ctypes
import errno
import os
import socket
import stat
import sys


def name(e):
    return errno.errorcode.get(e.errno, str(e.errno))


def connect(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    except OSError as e:
        return name(e)
    s.settimeout(5)
    return "ok " + s.makefile().readline().strip()


def bind(path, mask):
    os.umask(int(mask, 8))
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(path)
    except OSError as e:
        return name(e)
    st = os.stat(path)
    try:
        os.chmod(path, 0o666)
        chmod = "ok"
    except OSError as e:
        chmod = name(e)
    return "ok uid=%d gid=%d mode=%o chmod=%s" % (
        st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), chmod)


def unspec(port, serve):
    libc = ctypes.CDLL(None, use_errno=True)
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # struct sockaddr_in with sin_family = AF_UNSPEC and INADDR_ANY.
    addr = (socket.AF_UNSPEC).to_bytes(2, sys.byteorder) + port.to_bytes(2, "big") + bytes(12)
    if libc.bind(s.fileno(), addr, len(addr)) != 0:
        return errno.errorcode.get(ctypes.get_errno(), "?")
    if not serve:
        return "ok"
    s.listen(16)
    print("ok", flush=True)
    while True:
        c, _ = s.accept()
        c.sendall(b"squatter\n")
        c.close()


def main():
    op, args = sys.argv[1], sys.argv[2:]
    if op == "connect":
        print(connect(args[0]))
    elif op == "bind":
        print(bind(args[0], args[1]))
    elif op == "unspec":
        print(unspec(int(args[0]), args[1:] == ["serve"]))
    else:
        sys.exit("unknown op " + op)


main()

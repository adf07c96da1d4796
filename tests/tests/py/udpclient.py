"""Asks ADDRESS PORT twice, by sendto from an unconnected socket and by
send on a connected one; prints one line each: the answer and where it came
from (recvfrom, getpeername), 'no answer', or the errno name."""
import errno, socket, sys
address, port = sys.argv[1], int(sys.argv[2])
family = socket.AF_INET6 if ":" in address else socket.AF_INET

def show(kind, f):
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.settimeout(2)
    try:
        print(kind, f(s), flush=True)
    except socket.timeout:
        print(kind, "no answer", flush=True)
    except OSError as e:
        print(kind, errno.errorcode.get(e.errno, e.errno), flush=True)

def unconnected(s):
    s.sendto(b"ping", (address, port))
    data, src = s.recvfrom(2048)
    return "%s from port %d" % (data.decode(), src[1])

def connected(s):
    s.connect((address, port))
    s.send(b"ping")
    data = s.recv(2048)
    return "%s peer port %d" % (data.decode(), s.getpeername()[1])

show("unconnected", unconnected)
show("connected", connected)

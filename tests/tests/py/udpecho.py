"""A UDP echo server on ADDRESS PORT: prints the port getsockname gives
once bound, then answers every datagram with TAG#N:DATA, N counting the
datagrams this process has had (a restored or cloned copy counts on)."""
import socket, sys
tag, address, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
family = socket.AF_INET6 if ":" in address else socket.AF_INET
s = socket.socket(family, socket.SOCK_DGRAM)
if family == socket.AF_INET6:
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind((address, port))
print("bound", s.getsockname()[1], flush=True)
n = 0
while True:
    data, peer = s.recvfrom(2048)
    n += 1
    s.sendto(b"%s#%d:%s" % (tag.encode(), n, data), peer)

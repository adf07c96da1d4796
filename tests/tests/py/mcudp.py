"""memcached's UDP protocol (8-byte frame header, then the text protocol)
against 127.0.0.1:PORT: `set KEY VALUE`, or `get KEY` printing the value
or 'miss' or 'no answer'."""
import socket, struct, sys
op, port, key = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if op == "set":
    value = sys.argv[4].encode()
    body = b"set %s 0 0 %d\r\n%s\r\n" % (key.encode(), len(value), value)
else:
    body = b"get %s\r\n" % key.encode()
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2)
s.sendto(struct.pack(">HHHH", 7, 0, 1, 0) + body, ("127.0.0.1", port))
try:
    data, _ = s.recvfrom(65536)
except socket.timeout:
    print("no answer"); sys.exit(0)
req, seq, total, _ = struct.unpack(">HHHH", data[:8])
assert (req, seq, total) == (7, 0, 1), (req, seq, total)
reply = data[8:]
if op == "set":
    print(reply.decode().strip())
elif reply.startswith(b"VALUE"):
    print(reply.split(b"\r\n")[1].decode())
else:
    print("miss")

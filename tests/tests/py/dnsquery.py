"""Asks 127.0.0.1:PORT for the A record of NAME over UDP; prints the
address, or 'no answer' on timeout, or the error."""
import socket, struct, sys
name, port = sys.argv[1], int(sys.argv[2])
q = struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
q += struct.pack(">HH", 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2)
try:
    s.sendto(q, ("127.0.0.1", port))
    data, src = s.recvfrom(512)
except socket.timeout:
    print("no answer"); sys.exit(0)
except OSError as e:
    print("error", e.errno); sys.exit(0)
assert data[:2] == b"\x12\x34", data
print(socket.inet_ntoa(data[-4:]), "from", "%s:%d" % src)

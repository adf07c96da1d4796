"""One UDP socket kept for the whole run: for every line on stdin, sends
'ping' to ADDRESS PORT and prints the answer and the port it came from, or
'no answer'."""
import socket, sys
address, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2)
for _ in sys.stdin:
    s.sendto(b"ping", (address, port))
    try:
        data, src = s.recvfrom(2048)
        print(data.decode(), src[1], flush=True)
    except socket.timeout:
        print("no answer", flush=True)

"""An HTTP server that tells who it is, asked anew on every request:
its hostname (`socket.gethostname()` and `os.uname()`) and the contents
of an identity file, so that clones of one template can show what differs
between them.

    whoami.py PORT IDENTITY_FILE

GET / answers `hostname=H`, `uname=H`, a line `---`, then the file's
contents (or `unreadable: ERROR`).
"""
import http.server
import os
import socket
import sys

IDENTITY = sys.argv[2]


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        try:
            with open(IDENTITY) as f:
                identity = f.read()
        except OSError as e:
            identity = "unreadable: %s\n" % e
        body = "hostname=%s\nuname=%s\n---\n%s" % (
            socket.gethostname(),
            os.uname().nodename,
            identity,
        )
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


server = http.server.HTTPServer(("0.0.0.0", int(sys.argv[1])), Handler)
print("serving on port", sys.argv[1], flush=True)
server.serve_forever()

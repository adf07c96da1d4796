"""multiprocessing.Pipe() between a parent and a forked multiprocessing.Process
(a socketpair each keeps one end of): each sends before the snapshot and
receives after DIR/go; the parent writes what it got to DIR/out."""

import multiprocessing as mp, os, sys, time
DIR = sys.argv[1]
def child(conn):
    conn.send("from-child-before")
    while not os.path.exists(os.path.join(DIR, "go")):
        time.sleep(0.02)
    got = conn.recv()
    conn.send("child-got:" + got)
    time.sleep(3600)
if __name__ == "__main__":
    mp.set_start_method("fork")
    a, b = mp.Pipe()
    p = mp.Process(target=child, args=(b,))
    p.start()
    b.close()
    a.send("from-parent-before")
    time.sleep(0.3)
    print("ready", flush=True)
    while not os.path.exists(os.path.join(DIR, "go")):
        time.sleep(0.02)
    first = a.recv()
    second = a.recv()
    with open(os.path.join(DIR, "out"), "w") as f:
        f.write(first + " " + second)
    time.sleep(3600)

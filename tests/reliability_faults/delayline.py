#!/usr/bin/env python3
"""A userspace delay line for tests/reliability_faults (no netem needed).

Opens one TAP device per direction (created by this process, so they
vanish when it exits). Every Ethernet frame the kernel sends into a TAP is
read here, dropped with probability LOSS, otherwise held for
DELAY +/- JITTER (uniform) and written back into the same TAP, from where a
tc filter on the TAP's ingress sends it on; with probability DUPLICATE a
frame is sent twice, the copy with its own delay. See delayline.rs for the
wiring, and docs/reliability.md (case 3b).

Ordering: with --reorder, every frame is released at its own time (as netem
does), so a frame can be overtaken by frames that arrived less than
2 x JITTER after it (bounded reordering). Without it, a frame is never
released before one that arrived earlier in the same direction (FIFO): its
release time is max(its own, the previous frame's).

Protocol on stdin/stdout, one line each: it prints {"ready": ...} once both
TAPs exist, answers every "stats" line with a JSON object of counters, and
exits when stdin is closed (so it cannot outlive the test that started it).

Usage: delayline.py --tap NAME [--tap NAME ...] --delay-ms D --jitter-ms J
       [--loss P] [--duplicate P] [--seed N] [--reorder]
(P are fractions, 0.01 is 1 %.) Needs root (TUNSETIFF) and python3 only.
"""

import argparse
import fcntl
import heapq
import json
import os
import random
import select
import struct
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
# Frames read from one TAP per wakeup at most, so that releases stay on time.
READ_BATCH = 256


def open_tap(name):
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    ifr = struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI)
    fcntl.ioctl(fd, TUNSETIFF, ifr)
    return fd


class Direction:
    def __init__(self, name, fd):
        self.name = name
        self.fd = fd
        self.last_release = 0.0
        self.arrivals = 0  # sequence number of the next frame read
        self.newest_sent = -1  # highest arrival sequence written back
        self.received = 0
        self.received_bytes = 0
        self.dropped = 0
        self.duplicated = 0
        self.sent = 0
        self.sent_bytes = 0
        self.reordered = 0
        self.write_errors = 0
        self.hold_min = None
        self.hold_max = 0.0
        self.hold_sum = 0.0

    def stats(self):
        return {
            "tap": self.name,
            "received": self.received,
            "received_bytes": self.received_bytes,
            "dropped": self.dropped,
            "duplicated": self.duplicated,
            "sent": self.sent,
            "sent_bytes": self.sent_bytes,
            "reordered": self.reordered,
            "write_errors": self.write_errors,
            "hold_min_ms": (self.hold_min or 0.0) * 1000.0,
            "hold_max_ms": self.hold_max * 1000.0,
            "hold_mean_ms": (self.hold_sum / self.sent * 1000.0) if self.sent else 0.0,
        }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tap", action="append", required=True)
    p.add_argument("--delay-ms", type=float, required=True)
    p.add_argument("--jitter-ms", type=float, default=0.0)
    p.add_argument("--loss", type=float, default=0.0)
    p.add_argument("--duplicate", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--reorder", action="store_true")
    a = p.parse_args()
    if a.jitter_ms > a.delay_ms:
        sys.exit("delayline.py: jitter must not exceed delay")

    rng = random.Random(a.seed)
    delay = a.delay_ms / 1000.0
    jitter = a.jitter_ms / 1000.0
    dirs = {}
    for name in a.tap:
        d = Direction(name, open_tap(name))
        dirs[d.fd] = d
    stdin = sys.stdin.fileno()
    os.set_blocking(stdin, False)
    inbuf = b""
    # (release time, tie-breaker, direction, arrival sequence, arrival time, frame)
    pending = []
    tie = 0

    def say(obj):
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    say({"ready": [d.name for d in dirs.values()], "pid": os.getpid()})
    watched = [stdin] + list(dirs)
    # DELAYLINE_DEBUG=1: counters on stderr twice a second (the test prints
    # the script's stderr when it fails).
    debug = bool(os.environ.get("DELAYLINE_DEBUG"))
    next_debug = time.monotonic() + 0.5
    while True:
        if debug and time.monotonic() >= next_debug:
            next_debug += 0.5
            counts = [(d.name, d.received, d.sent, d.dropped) for d in dirs.values()]
            sys.stderr.write("%.1f %s pending=%d\n" % (time.monotonic(), counts, len(pending)))
            sys.stderr.flush()
        timeout = None
        if pending:
            timeout = max(0.0, pending[0][0] - time.monotonic())
        if debug:
            timeout = 0.5 if timeout is None else min(timeout, 0.5)
        readable, _, _ = select.select(watched, [], [], timeout)
        now = time.monotonic()
        for fd in readable:
            if fd == stdin:
                chunk = os.read(stdin, 4096)
                if not chunk:
                    return
                inbuf += chunk
                while b"\n" in inbuf:
                    line, inbuf = inbuf.split(b"\n", 1)
                    if line.strip() == b"stats":
                        say({
                            "directions": [d.stats() for d in dirs.values()],
                            "pending": len(pending),
                        })
                continue
            d = dirs[fd]
            for _ in range(READ_BATCH):
                try:
                    frame = os.read(fd, 65536)
                except BlockingIOError:
                    break
                seq = d.arrivals
                d.arrivals += 1
                d.received += 1
                d.received_bytes += len(frame)
                if rng.random() < a.loss:
                    d.dropped += 1
                    continue
                copies = 1
                if rng.random() < a.duplicate:
                    copies = 2
                    d.duplicated += 1
                for _ in range(copies):
                    release = now + delay + rng.uniform(-jitter, jitter)
                    if not a.reorder:
                        release = max(release, d.last_release)
                    d.last_release = max(d.last_release, release)
                    tie += 1
                    heapq.heappush(pending, (release, tie, d, seq, now, frame))
        now = time.monotonic()
        while pending and pending[0][0] <= now:
            _, _, d, seq, arrived, frame = heapq.heappop(pending)
            try:
                os.write(d.fd, frame)
            except OSError:
                d.write_errors += 1
                continue
            hold = now - arrived
            d.sent += 1
            d.sent_bytes += len(frame)
            d.hold_sum += hold
            d.hold_max = max(d.hold_max, hold)
            d.hold_min = hold if d.hold_min is None else min(d.hold_min, hold)
            if seq < d.newest_sent:
                d.reordered += 1
            d.newest_sent = max(d.newest_sent, seq)
            now = time.monotonic()


if __name__ == "__main__":
    main()

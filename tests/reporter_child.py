"""A unit's reporter in its own process, for tests that kill it: build an MqttReporter from the
arguments, submit `--count` hits, say so on stdout, then either wait to be killed, drain (with
`--marker ID`, then send one more hit with that id: a test that sees it arrive knows that nothing sent
before it is still on its way), or follow stdin (`--follow`: each line N submits N more hits, as the
pipeline does, and answers with one JSON line: how many failed and the outbox's problem; end of input
closes the reporter). Logs go to stderr.

    python tests/reporter_child.py --port 1883 --outbox /tmp/o.sqlite --count 100 --prefix a
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from pathlib import Path

from edge.outbox import OutboxConfig
from edge.reporter import MqttConfig, MqttReporter
from wire.records import Hit


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--site", default="site-a")
    ap.add_argument("--unit", default="unit-1")
    ap.add_argument("--outbox", type=Path, required=True)
    ap.add_argument("--count", type=int, default=0)
    ap.add_argument("--prefix", default="hit")
    ap.add_argument("--drain", action="store_true", help="wait until the outbox is empty, then exit 0")
    ap.add_argument("--marker", help="with --drain: once drained, send one more hit with this id and drain again")
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--follow", action="store_true", help="submit N more hits for each line N on stdin")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")

    reporter = MqttReporter(
        MqttConfig(
            host=args.host,
            port=args.port,
            site=args.site,
            heartbeat_interval_s=1.0,
            reconnect_min_delay_s=0.1,
            reconnect_max_delay_s=0.5,
        ),
        OutboxConfig(path=args.outbox),
        args.unit,
    )

    def hit(i: int, hit_id: str | None = None) -> Hit:
        return Hit(
            unit_id=args.unit,
            camera_id="cam-1",
            captured_at=time.time(),
            person_id=f"person-{i % 7}",
            score=0.8,
            threshold=0.6,
            margin=0.2,
            box=(10.0, 10.0, 60.0, 70.0),
            model_id="test-model",
            watchlist_version=3,
            id=hit_id or f"{args.prefix}-{i:05d}",
        )

    for i in range(args.count):
        reporter.submit(hit(i))
    print(f"submitted {args.count}", flush=True)
    if args.follow:
        n = args.count
        for line in sys.stdin:
            failed = 0
            for i in range(n, n + int(line)):
                try:
                    reporter.submit(hit(i))
                except Exception as e:  # as the pipeline does: log, count, go on
                    logging.getLogger("reporter_child").error("could not keep hit %d: %s", i, e)
                    failed += 1
            n += int(line)
            print(json.dumps({"failed": failed, "problem": reporter.outbox.problem}), flush=True)
        reporter.close(1.0)
        return 0
    if args.drain:
        ok = reporter.flush(args.timeout)
        if ok and args.marker:
            reporter.submit(hit(args.count, args.marker))
            ok = reporter.flush(args.timeout)
        reporter.close(2.0)
        print("drained" if ok else "not drained", flush=True)
        return 0 if ok else 1
    signal.pause()  # until the test kills this process
    return 1


if __name__ == "__main__":
    sys.exit(main())

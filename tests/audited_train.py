"""train.py's command line, recording the global id (document, position) of every input token each
process feeds, one JSON line per step, to $AUDIT_DIR/process_<i>-of-<n>.<pid>.jsonl. With
$AUDIT_SLOW_FROM=N it also sleeps a second before each step from N on, so a test can kill the run
at a known point (after a checkpoint's commit) however fast the machine trains."""

import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402


def runs(documents, positions):
    """A row's tokens as runs [document id, first position, last position]."""
    out = []
    for d, p in zip(documents.tolist(), positions.tolist()):
        if out and out[-1][0] == d and out[-1][2] + 1 == p:
            out[-1][2] = p
        else:
            out.append([d, p, p])
    return out


def main():
    files = {}
    slow_from = int(os.environ.get("AUDIT_SLOW_FROM", "0")) or None

    def record(step, batch):
        import jax

        if slow_from is not None and step >= slow_from:
            time.sleep(1.0)

        key = (jax.process_index(), jax.process_count())
        if key not in files:
            path = os.path.join(os.environ["AUDIT_DIR"],
                                f"process_{key[0]}-of-{key[1]}.{os.getpid()}.jsonl")
            files[key] = open(path, "a")
        rows = [runs(d, p) for d, p in zip(np.asarray(batch["document_ids"]),
                                           np.asarray(batch["positions"]))]
        files[key].write(json.dumps({"step": step, "rows": rows}) + "\n")
        files[key].flush()

    return train.main(sys.argv[1:], on_batch=record)


if __name__ == "__main__":
    sys.exit(main())

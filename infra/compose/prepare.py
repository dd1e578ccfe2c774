"""The compose stack's one-shot preparation: the bucket, the tiny target and the conversations.

Run by the `init` service before `specstream topics apply`; idempotent (a rerun reuses all three).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import s3fs

from pipeline.devkit.chats import markov_conversations, write_jsonl
from pipeline.devkit.target import build_tiny_target

MODELS = Path("/models")
BUCKET = os.environ.get("SPECSTREAM_BUCKET", "specstream")


def make_bucket(deadline_s: float = 120.0) -> None:
    """Create the bucket once the store answers (MinIO may still be starting; bounded)."""
    store = s3fs.S3FileSystem()  # endpoint and keys from AWS_ENDPOINT_URL / AWS_* in the environment
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            if not store.exists(BUCKET):
                store.mkdir(BUCKET)
            return
        except Exception as exc:  # noqa: BLE001 - connection refused arrives as botocore's or s3fs's own
            if time.monotonic() > deadline:
                raise SystemExit(f"error: the S3 store did not answer in {deadline_s:.0f} s: {exc}") from None
            time.sleep(2)  # the store is starting; retried until the deadline


def main() -> None:
    make_bucket()
    target = build_tiny_target(MODELS / "cache")
    link = MODELS / "tiny-target"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target)
    data = MODELS / "conversations.jsonl"
    if not data.exists():
        write_jsonl(markov_conversations(768, seed=0), str(data))
    print(f"bucket s3://{BUCKET}, target {target}, data {data}")


if __name__ == "__main__":
    main()

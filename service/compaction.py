"""Compaction: fold the live-update log into a new artifact version.

A delta segment and tombstones cost a little on every search and the log grows with every
write, so they are folded back: base + delta - tombstones become one plain IVF-PQ written as a
new version (same model, manifest `applied_seq` = the last record it contains, `compacted`
record, drift report), validated like any artifact, published, and only then is the log trimmed
(records <= applied_seq; a service swapping to the new version replays just the newer ones).

Two entry points: `jointpq compact --artifact-root R` (no service needed: loads the current
version and replays the log itself) and POST /admin/compact (folds the view the worker serves,
then swaps to the result; see routes/admin.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

from index import load_index, write_artifact
from index.canary import CANARY
from index.drift import report
from index.live import LiveIndex, replay
from index.pointer import POINTER, current_version, publish
from index.wal import WriteAheadLog

log = logging.getLogger("jointpq.compaction")
_SUFFIX = re.compile(r"-c\d+$")


def compacted_name(parent: str, seq: int) -> str:
    """`shop-v3` -> `shop-v3-c120`; a compacted version's suffix is replaced, not stacked."""
    return f"{_SUFFIX.sub('', parent)}-c{seq}"


def write_compacted(root: Path, parent: Path, view: LiveIndex) -> Path:
    """Write `view` (base + delta - tombstones) as a new version beside `parent`; returns its
    path after it loaded and verified. Nothing is published here."""
    from model.indexing import carried_canaries, copied_model_files

    t0 = time.perf_counter()
    manifest = view.manifest
    if manifest is None:
        raise ValueError("cannot compact an index that was never written as an artifact")
    index = view.compacted()
    training = dict(manifest.training)
    stats = view.drift_stats().merged((training.get("drift") or {}).get("new_items"))
    training["drift"] = report(training.get("drift_baseline"), stats, index.list_sizes())
    training["applied_seq"] = view.applied_seq
    training["compacted"] = {
        "parent": manifest.version,
        "applied_seq": view.applied_seq,
        "base_items": view.data.n,
        "deleted_base_items": view.n_dead,
        "delta_items": view.delta.n,
        "items": index.n,
    }
    extra: dict[str, bytes | str | Path] = dict(copied_model_files(parent, manifest.files))
    canaries = carried_canaries(parent, index)
    if canaries is not None:
        extra[CANARY] = canaries.dumps()
    training["compacted"]["fold_seconds"] = round(time.perf_counter() - t0, 3)
    out = root / compacted_name(manifest.version, view.applied_seq)
    write_artifact(out, index, training=training, extra_files=extra, overwrite=out.exists())
    load_index(out, device="cpu")  # refuse to hand over anything that does not load and verify
    return out


def compact_root(root: str | Path, pointer: str = POINTER, publish_it: bool = True) -> dict[str, Any]:
    """`jointpq compact`: the current version + its log records -> a new version, published,
    log trimmed. Returns what happened (nothing to do when the log holds nothing new)."""
    from model.towers import NoItemTower, load_item_encoder, tower_fingerprint

    root = Path(root)
    t0 = time.perf_counter()
    version = current_version(root, pointer)
    if version is None:
        raise ValueError(f"{root}: no artifact to compact")
    parent = root / version
    base = load_index(parent, device="cpu")
    seq = int((base.manifest.training or {}).get("applied_seq") or 0) if base.manifest else 0
    wal = WriteAheadLog(root)
    entries = wal.read_all(after=seq)
    if not entries:
        return {"compacted": False, "reason": f"the log holds nothing after seq {seq}", "version": version}
    encoder = None

    def encode(texts: list[str]):
        nonlocal encoder
        from .holder import encode_by_length

        if encoder is None:
            try:
                encoder = load_item_encoder(parent).eval()
            except NoItemTower as e:
                raise ValueError(f"{e} (needed to re-encode logged texts)") from None
        return encode_by_length(encoder, texts)

    view = replay(LiveIndex(base, seq), entries, encode, tower_fingerprint(base.manifest.files))
    out = write_compacted(root, parent, view)
    if publish_it:
        publish(root, out.name, pointer)
        kept = wal.trim(view.applied_seq)
    else:
        kept = None
    return {
        "compacted": True,
        "version": out.name,
        "parent": version,
        "applied_seq": view.applied_seq,
        "records": len(entries),
        "items": view.n_live,
        "published": publish_it,
        "log_records_kept": kept,
        "seconds": round(time.perf_counter() - t0, 3),
    }


def add_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compact",
        help="fold the live-update log (POST /admin/items) into a new artifact version, publish it, trim the log",
        epilog="example:\n  jointpq compact --artifact-root artifacts/demo",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--artifact-root", required=True, type=Path, help="the root whose CURRENT version and log to fold")
    p.add_argument("--pointer", default=POINTER, help="pointer file naming the current version")
    p.add_argument("--no-publish", action="store_true", help="write the version but leave CURRENT and the log alone")
    p.set_defaults(func=_compact)


def _compact(args: argparse.Namespace) -> int:
    print(json.dumps(compact_root(args.artifact_root, args.pointer, publish_it=not args.no_publish)))
    return 0

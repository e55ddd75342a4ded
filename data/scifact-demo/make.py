"""Rebuild this SciFact subset from the full BEIR SciFact directory (reproducible, seed 0):

    python data/scifact-demo/make.py ../shared/data/scifact data/scifact-demo

Keeps every judged abstract (667) plus random others up to 2,000, all 1,109 claims and both
qrels files, in the BEIR layout.
"""

import gzip
import json
import random
import shutil
import sys
from pathlib import Path

N_DOCS, SEED = 2000, 0


def main(src: Path, dst: Path) -> None:
    with gzip.open(src / "corpus.jsonl.gz", "rt", encoding="utf-8") as f:
        docs = [json.loads(line) for line in f if line.strip()]
    judged = set()
    for split in ("train", "test"):
        for line in (src / "qrels" / f"{split}.tsv").read_text(encoding="utf-8").splitlines()[1:]:
            judged.add(line.split("\t")[1])
    others = [d["_id"] for d in docs if d["_id"] not in judged]
    keep = judged | set(random.Random(SEED).sample(others, N_DOCS - len(judged)))
    dst.mkdir(parents=True, exist_ok=True)
    with open(dst / "corpus.jsonl.gz", "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        for d in docs:
            if d["_id"] in keep:
                gz.write((json.dumps(d, ensure_ascii=False) + "\n").encode())
    shutil.copyfile(src / "queries.jsonl", dst / "queries.jsonl")
    (dst / "qrels").mkdir(exist_ok=True)
    for split in ("train", "test"):
        shutil.copyfile(src / "qrels" / f"{split}.tsv", dst / "qrels" / f"{split}.tsv")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))

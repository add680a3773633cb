"""Cut the small, class-balanced CIFAR-10 subset that ships with the examples.

`examples/run_vit.py` trains on this subset by default so that the example runs
end to end offline and in a few minutes on a laptop CPU. The subset is the first
`--train_per_class` / `--test_per_class` rows of each class in the local copy of
CIFAR-10, whose rows are already shuffled (seed 0), so the cut is deterministic
and needs no random seed. Rows keep their original order and their original
bytes, and the files keep the source's `datasets` features (`img` as
`datasets.Image`, `label` as `datasets.ClassLabel` with the 10 names).

    python examples/make_cifar10_subset.py [--source_dir ../shared/data/cifar10]

writes `examples/data/cifar10_subset/{train,test}.parquet` and a README.md that
records where the rows came from.
"""

import argparse
import hashlib
import json
import shlex
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

EXAMPLES_DIR = Path(__file__).resolve().parent
REPO_ROOT = EXAMPLES_DIR.parent
DEFAULT_SOURCE_DIR = REPO_ROOT.parent / "shared" / "data" / "cifar10"
DEFAULT_OUTPUT_DIR = EXAMPLES_DIR / "data" / "cifar10_subset"

README_TEMPLATE = """\
# CIFAR-10 subset (embedded example data)

A class-balanced subset of CIFAR-10 that `examples/run_vit.py` trains and evaluates on
by default, so the example needs no download.

| file | rows |
| --- | --- |
{rows_table}

Rows per class:

| class | {split_header} |
| --- | {split_rule} |
{class_table}

Schema, the same as the `cifar10` data set on the Hugging Face Hub (`uoft-cs/cifar10`):

- `img`: `datasets.Image()` (JPEG bytes, 32x32 RGB)
- `label`: `datasets.ClassLabel(names={names})`

```python
from datasets import load_dataset
ds = load_dataset("parquet", data_files={{"train": "train.parquet", "test": "test.parquet"}})
```

## How it was made

The first rows of each class, in the source's order, from a local copy of CIFAR-10
whose rows are shuffled (seed 0) and whose images are JPEG-compressed copies of the
originals. Made from the repository root with:

```
{command}
```

Source files (sha256):

{source_hashes}

## Source and licence

CIFAR-10 was collected by Alex Krizhevsky, Vinod Nair and Geoffrey Hinton
(https://www.cs.toronto.edu/~kriz/cifar.html) as a labelled subset of the
80 Million Tiny Images collection. Its web page states no licence and asks users to
cite the technical report; the Hugging Face Hub copy (`uoft-cs/cifar10`) lists the
licence as "unknown".

> Alex Krizhevsky. *Learning Multiple Layers of Features from Tiny Images.*
> Technical report, University of Toronto, 2009.
"""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def class_names(table) -> list[str]:
    """The ClassLabel names that `datasets` stored in the parquet schema metadata."""
    features = json.loads(table.schema.metadata[b"huggingface"])["info"]["features"]
    return features["label"]["names"]


def first_rows_per_class(labels: list[int], per_class: int, num_classes: int) -> list[int]:
    """Indices of the first `per_class` rows of every class, in the original order."""
    taken = Counter()
    indices = []
    for index, label in enumerate(labels):
        if taken[label] < per_class:
            taken[label] += 1
            indices.append(index)
    short = {label: taken[label] for label in range(num_classes) if taken[label] < per_class}
    if short:
        raise ValueError(f"not enough rows for {per_class} per class; rows found per class: {short}")
    return indices


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--source_dir",
        type=Path,
        default=DEFAULT_SOURCE_DIR,
        help="directory with the full CIFAR-10 train.parquet and test.parquet (default: %(default)s)",
    )
    parser.add_argument("--output_dir", type=Path, default=DEFAULT_OUTPUT_DIR, help="default: %(default)s")
    parser.add_argument("--train_per_class", type=int, default=500)
    parser.add_argument("--test_per_class", type=int, default=100)
    args = parser.parse_args()

    args.output_dir.mkdir(parents=True, exist_ok=True)
    per_class = {"train": args.train_per_class, "test": args.test_per_class}
    counts, hashes, names = {}, {}, None
    for split, n in per_class.items():
        source = args.source_dir / f"{split}.parquet"
        if not source.is_file():
            raise FileNotFoundError(f"{source} not found; pass --source_dir, the directory holding the full CIFAR-10")
        hashes[source.name] = sha256(source)
        table = pq.read_table(source)
        names = class_names(table)
        indices = first_rows_per_class(table.column("label").to_pylist(), n, len(names))
        subset = table.take(indices)  # keeps the schema metadata, hence the datasets features
        pq.write_table(subset, args.output_dir / f"{split}.parquet")
        counts[split] = Counter(subset.column("label").to_pylist())

    command = shlex.join(["python", *sys.argv])
    readme = README_TEMPLATE.format(
        rows_table="\n".join(f"| {split}.parquet | {sum(c.values()):,} |" for split, c in counts.items()),
        split_header=" | ".join(counts),
        split_rule=" | ".join("---" for _ in counts),
        class_table="\n".join(
            f"| {name} | " + " | ".join(str(c[label]) for c in counts.values()) + " |"
            for label, name in enumerate(names)
        ),
        names=json.dumps(names),
        command=command,
        source_hashes="\n".join(f"- {name} {digest}" for name, digest in hashes.items()),
    )
    (args.output_dir / "README.md").write_text(readme)
    total = sum(p.stat().st_size for p in args.output_dir.iterdir())
    rows = {split: sum(c.values()) for split, c in counts.items()}
    print(f"wrote {args.output_dir} ({total / 1e6:.2f} MB): {rows}")


if __name__ == "__main__":
    main()

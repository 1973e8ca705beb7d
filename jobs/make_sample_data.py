"""Write the procedurally generated sample dataset in the ILSVRC-2012 layout.

    python jobs/make_sample_data.py --out data/sample/raw
    python jobs/make_sample_data.py --out /tmp/tiny --classes 4 --train-per-class 20 --val-per-class 5

OUT gets train/<wnid>/<wnid>_<n>.JPEG, flat val/ILSVRC2012_val_<8 digits>.JPEG with Kaggle's
LOC_val_solution.csv, and LOC_synset_mapping.txt. The same --seed gives the same files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # so `pipeline` imports without an install

from pipeline.data.sample import SYNSETS, make_sample
from pipeline.errors import InputError
from pipeline.redaction import scrubbed_output


def main(argv: list[str] | None = None) -> int:
    scrubbed_output()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--classes", type=int, default=len(SYNSETS), help=f"number of classes, 2..{len(SYNSETS)}")
    parser.add_argument("--train-per-class", type=int, default=260)
    parser.add_argument("--val-per-class", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        out = make_sample(args.out, args.classes, args.train_per_class, args.val_per_class, args.seed)
    except InputError as exc:
        parser.error(str(exc))
    print(
        f"wrote {args.classes * args.train_per_class} train and {args.classes * args.val_per_class} val images "
        f"of {args.classes} classes to {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

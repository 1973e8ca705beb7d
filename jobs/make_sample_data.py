"""Write the procedurally generated sample dataset in the ILSVRC-2012 layout.

    python jobs/make_sample_data.py --output data/sample/raw
    python jobs/make_sample_data.py --output /tmp/tiny --classes 4 --train-per-class 20 --val-per-class 5

OUTPUT gets train/<wnid>/<wnid>_<n>.JPEG, flat val/ILSVRC2012_val_<8 digits>.JPEG with Kaggle's
LOC_val_solution.csv, and LOC_synset_mapping.txt. The same --seed gives the same files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # so `pipeline` imports without an install

from pipeline import cli
from pipeline.data.sample import SYNSETS, contact_sheet, make_sample
from pipeline.errors import InputError
from pipeline.redaction import scrubbed_output


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser(__doc__)
    parser.add_argument("--output", help="a new folder, or one this job wrote before")
    parser.add_argument("--classes", type=int, default=len(SYNSETS), help=f"number of classes, 2..{len(SYNSETS)}")
    parser.add_argument("--train-per-class", type=int, default=260, help="training images per class")
    parser.add_argument("--val-per-class", type=int, default=50, help="validation images per class")
    parser.add_argument("--seed", type=int, default=0, help="the same seed gives the same files")
    parser.add_argument("--contact-sheet", metavar="PNG", help="also a picture of it: a row per class, 8 images each")
    cli.renamed(parser, "--out", "--output")
    return parser


def main(argv: list[str] | None = None) -> int:
    scrubbed_output()
    parser = build_parser()
    args = parser.parse_args(argv)
    cli.require(parser, args, "--output")
    try:
        out = make_sample(args.output, args.classes, args.train_per_class, args.val_per_class, args.seed)
    except InputError as exc:
        parser.error(str(exc))
    print(
        f"wrote {args.classes * args.train_per_class} train and {args.classes * args.val_per_class} val images "
        f"of {args.classes} classes to {out}"
    )
    if args.contact_sheet:
        contact_sheet(out).save(args.contact_sheet)
        print(f"contact sheet: {args.contact_sheet}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`d3n data import|check|synth`: bring datasets into the YOLO layout, check them, synthesise one."""

from __future__ import annotations

import argparse

FORMATS = ("voc", "yolo", "coco", "masks")  # d3n.data.importer.FORMATS, without importing it at start-up


def register(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="dataset tools: import, add, check, synth")
    cmds = data.add_subparsers(dest="data_command", metavar="ACTION")
    data.set_defaults(func=lambda args: (data.print_help(), 2)[1])

    p = cmds.add_parser("import", help="import a VOC / YOLO / COCO / mask dataset into the d3n YOLO layout",
                        description="Autodetects the format: VOC (ANNOTATIONS/ or Annotations/ with IMAGES/ "
                        "or JPEGImages/), YOLO (data.yaml with images/ and labels/), COCO (a .json with "
                        "images, annotations, categories) or masks (one mask PNG per image: images/ + "
                        "masks/, MVTec-like ground_truth/, KSDD2-like *_GT.png; each mask region becomes a "
                        "box, an all-zero mask a defect-free image). Every image is decoded and every box checked; "
                        "all problems are listed before failing. Splits are train, val and an optional "
                        "held-out test (data.yaml then has test: images/test); the source's own test split "
                        "(YOLO test: folder or images/test, COCO instances_test*.json beside the train/val "
                        "JSONs) is kept. An empty train split is an error unless --eval-only is given.")
    p.add_argument("src", help="source dataset folder (or COCO .json / YOLO data.yaml)")
    p.add_argument("--out", required=True, help="dataset folder to create")
    p.add_argument("--format", choices=FORMATS, help="source format (default: autodetect)")
    p.add_argument("--splits", help="folder with train.txt and val.txt listing stems, and optionally test.txt "
                                    "(a stem in none of them, or in two, is an error)")
    p.add_argument("--val-frac", type=float, default=None,
                   help="share of images in val for a random split, in [0, 1) (default 0.2; a source with "
                        "its own train and val keeps its split unless this is given). 1.0 is refused: "
                        "an evaluation-only set takes --eval-only")
    p.add_argument("--test-frac", type=float, default=None,
                   help="share of images in a held-out test split, drawn with val from the same seeded "
                        "shuffle, disjoint from it (default: no random test; replaces the source's own split)")
    p.add_argument("--eval-only", action="store_true",
                   help="an evaluation set: allow an empty train split; every image goes to test "
                        "(or where --splits says; train.txt / val.txt are then optional)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random split (default 0)")
    p.add_argument("--names", help="class names in order: comma-separated or a file with one per line "
                                   "(default: VOC alphabetical, COCO by category id, YOLO from data.yaml)")
    p.add_argument("--skip-bad", action="store_true", help="leave bad images out (listed in import_report.json)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=_import)

    p = cmds.add_parser("add", help="add new labelled images to a dataset as a new data version",
                        description="Imports NEW with the same checks as `d3n data import` (VOC / YOLO / COCO / masks, "
                        "the dataset's class names) and adds every image to one split of DATA, as a new "
                        "version in DATA/versions.json. Nothing changes if a check fails or a name is "
                        "taken. For DATA inside a pipeline run (RUN/data/dataset), the next `d3n pipeline` "
                        "brings the chain up to date incrementally (see the config's update: section). "
                        "An addition killed while moving images in is completed by --finish (or the next add).")
    p.add_argument("new", nargs="?", help="folder (or COCO .json / YOLO data.yaml) with the new images")
    p.add_argument("--to", required=True, help="dataset folder to add to (with data.yaml)")
    p.add_argument("--split", default="train", choices=("train", "val"),
                   help="where the images go (default train; the test split stays fixed)")
    p.add_argument("--format", choices=FORMATS, help="format of NEW (default: autodetect)")
    p.add_argument("--skip-bad", action="store_true", help="leave bad images out instead of failing")
    p.add_argument("--finish", action="store_true", help="complete an addition that was interrupted while "
                                                         "moving images in; without NEW nothing else is added "
                                                         "(an addition with NEW completes it first anyway)")
    p.set_defaults(func=_add)

    p = cmds.add_parser("check", help="per-class counts and every bad file of a dataset")
    p.add_argument("data", help="dataset folder (with data.yaml)")
    p.set_defaults(func=_check)

    p = cmds.add_parser("synth", help="render the synthetic steel-defect dataset")
    p.add_argument("--out", required=True, help="dataset folder to create (YOLO layout)")
    p.add_argument("--images", type=int, default=240, help="number of images (default 240)")
    p.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--val-frac", type=float, default=0.2, help="share of images in val (default 0.2)")
    p.add_argument("--test-frac", type=float, default=0.0,
                   help="share of images in a held-out test split (default 0: no test split)")
    p.add_argument("--rare", help="a class cut to --rare-keep of its defects in the train split only "
                                   "(val and test keep all: an augmentation study's setting)")
    p.add_argument("--rare-keep", type=float, default=0.1, help="share of the rare class's defects kept (default 0.1)")
    p.add_argument("--force", action="store_true", help="replace --out if it holds something else")
    p.set_defaults(func=_synth)


def _synth(args: argparse.Namespace) -> int:
    from d3n.data.synth import generate

    out = generate(args.out, images=args.images, size=args.size, seed=args.seed,
                   val_frac=args.val_frac, overwrite=args.force, test_frac=args.test_frac, rare=args.rare,
                   rare_keep=args.rare_keep)
    print(f"synthetic dataset: {out} ({args.images} images, {args.size}px); preview: {out / 'preview.png'}")
    return 0


def _import(args: argparse.Namespace) -> int:
    from d3n.data.check import format_counts
    from d3n.data.importer import REPORT, import_dataset, parse_names

    report = import_dataset(args.src, args.out, fmt=args.format, splits=args.splits, val_frac=args.val_frac,
                            seed=args.seed, skip_bad=args.skip_bad, names=parse_names(args.names),
                            force=args.force, test_frac=args.test_frac, eval_only=args.eval_only)
    print(format_counts(report["counts"], report["names"]))
    print(f"imported {args.src} ({report['format']}) -> {args.out}; split: {report['split']}")
    if report["clipped_boxes"]:
        print(f"{report['clipped_boxes']} box(es) overshot the image by <= 1 px and were clipped")
    if report["skipped_count"]:
        print(f"skipped {report['skipped_count']} bad image(s): {', '.join(report['skipped_files'])}")
        print(f"because of {len(report['problems'])} problem(s):")
        for item in report["problems"]:
            print(f"  {item['file']}: {item['reason']}")
    print(f"report: {args.out}/{REPORT}")
    return 0


def _add(args: argparse.Namespace) -> int:
    from d3n.data import versions
    from d3n.errors import DataError

    if args.new is None:  # --finish alone (an addition with NEW completes an interrupted one first, too)
        if not args.finish:
            raise DataError("d3n data add: name the folder of new images (or --finish an interrupted addition)")
        done = versions.finish(args.to)
        print(f"{args.to}: " + (f"completed the interrupted addition: data version {done['version']}" if done
                                 else "no interrupted addition to complete"))
        return 0
    entry = versions.add(args.new, args.to, split=args.split, fmt=args.format, skip_bad=args.skip_bad)
    n = sum(entry["images"].values())
    print(f"added {n} image(s) from {args.new} to {args.to} ({args.split}): data version {entry['version']}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from d3n.data.check import check_dataset, format_counts

    layout, counts, problems = check_dataset(args.data)
    print(f"{layout.root}: {layout.nc} classes")
    if counts:
        print(format_counts(counts, layout.names))
    if problems:
        print(f"{len(problems)} problem(s):")
        for p in problems:
            print(f"  {p}")
        return 1
    print("no problems found")
    return 0

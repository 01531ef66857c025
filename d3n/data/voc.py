"""Pascal VOC reader: ANNOTATIONS/*.xml (or Annotations/) paired by stem with IMAGES/ (or JPEGImages/)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from d3n.data.source import Record, Source, image_files, voc_dirs
from d3n.data.validate import FileProblem, Problem


def _number(obj: ET.Element, tag: str, xml: Path, what: str) -> float:
    node = obj.find(tag)
    if node is None or node.text is None:
        raise FileProblem(xml, f"{what}: missing <{tag}>")
    try:
        return float(node.text.strip())
    except ValueError:
        raise FileProblem(xml, f"{what}: <{tag}> is not a number ({node.text.strip()!r})") from None


def parse_xml(xml: Path) -> tuple[list[tuple], tuple[int, int] | None]:
    """Boxes [(name, x0, y0, x1, y1)] and the declared (w, h) of one VOC file.

    VOC coordinates are taken as pixel edges (x1 - x0 is the width), as ultralytics' converter does.
    """
    try:
        root = ET.parse(xml).getroot()
    except ET.ParseError as exc:
        raise FileProblem(xml, f"malformed XML ({exc})") from None
    size = None
    if root.find("size") is not None:
        s = root.find("size")
        w, h = _number(s, "width", xml, "<size>"), _number(s, "height", xml, "<size>")
        size = (int(w), int(h)) if w > 0 and h > 0 else None
    boxes = []
    for k, obj in enumerate(root.iter("object"), 1):
        name = (obj.findtext("name") or "").strip()
        what = f"object {k} ({name or 'no name'})"
        if not name:
            raise FileProblem(xml, f"{what}: missing <name>")
        bb = obj.find("bndbox")
        if bb is None:
            raise FileProblem(xml, f"{what}: missing <bndbox>")
        boxes.append((name, *(_number(bb, t, xml, what) for t in ("xmin", "ymin", "xmax", "ymax"))))
    return boxes, size


def read_voc(src: Path) -> Source:
    ann_dir, img_dir = voc_dirs(src)
    images = image_files(img_dir)
    records, problems = [], []
    xml_stems = set()
    for xml in sorted(ann_dir.glob("*.xml")):
        xml_stems.add(xml.stem)
        found = images.get(xml.stem, [])
        rec = Record(stem=xml.stem, ann=xml, image=found[0] if len(found) == 1 else None)
        if not found:
            other = sorted(p.name for p in img_dir.glob(f"{xml.stem}.*"))
            why = f"{', '.join(other)}: unsupported image type" if other else f"no {xml.stem}.* in {img_dir}"
            rec.problems.append(Problem(xml, f"annotation without image ({why})"))
        elif len(found) > 1:
            rec.problems.append(Problem(xml, f"several images share this stem: {', '.join(p.name for p in found)}"))
        try:
            rec.boxes, rec.size = parse_xml(xml)
        except FileProblem as exc:
            rec.problems.append(exc.problem)
        records.append(rec)
    for stem, paths in images.items():
        if stem not in xml_stems:
            problems += [Problem(p, f"image without annotation (no {ann_dir / (stem + '.xml')})") for p in paths]
    names = sorted({b[0] for r in records for b in r.boxes})  # VOC has no class list: alphabetical
    return Source("voc", src, records, names, problems, image_stems=set(images))

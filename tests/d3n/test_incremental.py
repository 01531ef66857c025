"""Incremental retraining: `d3n data add` and a pipeline rerun that catches up instead of retraining."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from d3n.artifacts import MANIFEST, read_json
from d3n.cli import main
from d3n.data import versions
from d3n.data.layout import DatasetLayout
from d3n.errors import DataError

STAGES = ("ddpm", "repo", "resvae", "compress", "baseline", "teacher", "distill", "export")


def _new_images(root: Path, n: int, prefix: str = "new_", seed: int = 7) -> Path:
    """A YOLO dataset of `n` synthetic images whose names do not clash with the micro dataset's."""
    from d3n.data.synth import generate

    src = generate(root / "raw", images=n, size=96, seed=seed, val_frac=0.0)
    for img in (src / "images" / "train").iterdir():
        lbl = src / "labels" / "train" / f"{img.stem}.txt"
        lbl.rename(lbl.with_name(f"{prefix}{lbl.name}"))
        img.rename(img.with_name(f"{prefix}{img.name}"))
    return src


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.npy"))}


def test_data_add_refuses_clashes_and_the_test_split(synth_small, tmp_path):
    data = tmp_path / "data"
    import shutil

    shutil.copytree(synth_small, data)
    before = sorted(p.name for p in (data / "images" / "train").iterdir())
    same = _new_images(tmp_path / "a", 2, prefix="")  # synth_00000.jpg ... again
    with pytest.raises(DataError, match=r"share a name .* synth_0000[01]\.jpg"):
        versions.add(same, data, progress=False)
    fresh = _new_images(tmp_path / "b", 2)
    with pytest.raises(DataError, match="test split stays fixed"):
        versions.add(fresh, data, split="test", progress=False)
    assert sorted(p.name for p in (data / "images" / "train").iterdir()) == before  # nothing changed
    assert versions.current(data) == 1
    entry = versions.add(fresh, data, progress=False)
    assert entry["version"] == 2 and entry["added"] == {"train": ["new_synth_00000", "new_synth_00001"]}
    layout = DatasetLayout.open(data)
    assert {"new_synth_00000", "new_synth_00001"} <= {p.stem for p in layout.images("train")}
    assert layout.labels(data / "images" / "train" / "new_synth_00000.jpg").shape[1] == 5
    assert [v["version"] for v in versions.read(data)] == [1, 2]  # version 1 recorded for an older dataset


def test_data_add_checks_images_like_import(synth_small, tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(synth_small, data)
    bad = _new_images(tmp_path / "bad", 2)
    (bad / "images" / "train" / "new_synth_00000.jpg").write_bytes(b"not a jpeg")
    assert main(["data", "add", str(bad), "--to", str(data)]) != 0
    assert "new_synth_00000.jpg" in capsys.readouterr().err
    assert not (data / "images" / "train" / "new_synth_00001.jpg").exists()  # all or nothing
    assert not list(data.glob(".add-*"))


@pytest.mark.slow
def test_rerun_after_data_add_catches_up(micro_config, tmp_path):
    """Micro chain, 4 images added to train, rerun: the DDPM is fine-tuned, the repositories get the
    new images only (old shards byte-identical), the compressor is reused, the detectors are
    fine-tuned from their previous best.pt, the student is re-exported; every stage records data
    version 2; a further rerun does nothing."""
    cfg = tmp_path / "micro.yaml"
    run = tmp_path / "run"
    micro_config["train"]["epochs"] = 2
    cfg.write_text(yaml.safe_dump({**micro_config, "out": str(run), "update": {"ddpm_steps": 2, "epochs": 1}}))
    assert main(["pipeline", str(cfg)]) == 0
    old_ids = json.loads((run / "repo" / "train" / "store.json").read_text())["image_ids"]
    old = {s: _hashes(run / s / "train" / "shards") for s in ("repo", "compress")}
    old_val = _hashes(run / "repo" / "val" / "shards")
    old_compressor = (run / "resvae" / "compressor.pt").read_bytes()
    old_ddpm = (run / "ddpm" / "ddpm.pt").read_bytes()

    assert main(["data", "add", str(_new_images(tmp_path, 4)), "--to", str(run / "data" / "dataset")]) == 0
    assert main(["pipeline", str(cfg)]) == 0

    states = {s: read_json(run / s / ".pipeline.json") for s in STAGES}
    assert {s: st["data_version"] for s, st in states.items()} == dict.fromkeys(STAGES, 2)
    assert all(states[s]["made"] == "updated for data version 2" for s in ("ddpm", "repo", "resvae", "compress"))
    assert all(states[s]["made"] == "fine-tuned for data version 2" for s in ("baseline", "teacher", "distill"))
    assert states["export"]["made"] == "ran"
    assert all(states[s]["seconds"] >= 0 for s in STAGES)  # every stage's time, updated ones included
    # the repositories: old images first, in their old shards, untouched; the new ones extracted alone
    index = json.loads((run / "repo" / "train" / "store.json").read_text())
    assert index["image_ids"][:len(old_ids)] == old_ids and len(index["image_ids"]) == len(old_ids) + 4
    assert read_json(run / "repo" / "train" / "metrics.json")["images_built_this_run"] == 4
    for s in ("repo", "compress"):
        now = _hashes(run / s / "train" / "shards")
        assert {k: now[k] for k in old[s]} == old[s] and len(now) > len(old[s])
    assert _hashes(run / "repo" / "val" / "shards") == old_val
    assert (run / "resvae" / "compressor.pt").read_bytes() == old_compressor
    assert (run / "ddpm" / "ddpm.pt").read_bytes() != old_ddpm
    assert read_json(run / "ddpm" / "metrics.json")["finetuned"][0]["steps"] == 2
    # the detectors: a fresh run of 1 epoch from the previous best, which stays beside it
    for s in ("baseline", "teacher", "distill"):
        assert (run / s / "previous.pt").exists() and read_json(run / s / MANIFEST)["complete"]
        assert yaml.safe_load((run / s / "config.yaml").read_text())["train"]["epochs"] == 1
    # the teacher still sees every train image's features (old and new)
    from d3n.train.repository.store import FeatureStore

    latents = FeatureStore.open(run / "compress" / "train")
    assert all(latents.has(p.stem) for p in DatasetLayout.open(run / "data" / "dataset").images("train"))
    assert latents.get("new_synth_00003")["p3"].shape == latents.get(old_ids[-1])["p3"].shape

    made = {s: (run / s / MANIFEST).stat().st_mtime for s in STAGES}
    assert main(["pipeline", str(cfg)]) == 0
    assert {s: (run / s / MANIFEST).stat().st_mtime for s in STAGES} == made

    # a second addition: the detectors fine-tune again, from the best.pt the first update made
    first_best = hashlib.sha256((run / "baseline" / "best.pt").read_bytes()).hexdigest()
    assert main(["data", "add", str(_new_images(tmp_path / "second", 2, prefix="second_")), "--to",
                 str(run / "data" / "dataset")]) == 0
    assert main(["pipeline", str(cfg)]) == 0
    assert read_json(run / "baseline" / ".pipeline.json")["made"] == "fine-tuned for data version 3"
    assert hashlib.sha256((run / "baseline" / "previous.pt").read_bytes()).hexdigest() == first_best
    assert len((run / "baseline" / "results.csv").read_text().splitlines()) == 2  # header + its one epoch
    builds = json.loads((run / "repo" / "train" / "store.json").read_text())["meta"]["builds"]
    assert [b["images"] for b in builds] == [len(old_ids), 4, 2] and len({b["ddpm_sha256"] for b in builds}) == 3

    # update.mode full: the same kind of addition reruns everything downstream from scratch
    cfg.write_text(yaml.safe_dump({**micro_config, "out": str(run), "update": {"mode": "full"}}))
    assert main(["data", "add", str(_new_images(tmp_path / "more", 2, prefix="more_")), "--to",
                 str(run / "data" / "dataset")]) == 0
    assert main(["pipeline", str(cfg)]) == 0
    states = {s: read_json(run / s / ".pipeline.json") for s in STAGES}
    assert {s: (st["made"], st["data_version"]) for s, st in states.items()} == dict.fromkeys(STAGES, ("ran", 4))
    assert not (run / "baseline" / "previous.pt").exists()


def test_a_field_added_later_keeps_old_keys_at_its_default():
    """teacher.start came with incremental updates: unset, it is not in the identity, so teacher
    runs made before it existed keep their keys (an upgrade retrains nothing)."""
    from d3n.config import identity
    from d3n.train.teacher.stage import Config

    assert "start" not in identity(Config())
    assert identity(Config(start=Path("prev.pt")))["start"] == Path("prev.pt")


def test_an_addition_killed_while_moving_is_completed_and_blocks_until_then(synth_small, tmp_path, monkeypatch,
                                                                            capsys):
    """Killed after its journal and two moves: reading the versions names the journal; `--finish`
    replays the rest; the dataset ends exactly as an uninterrupted addition leaves it."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(synth_small, data)
    fresh = _new_images(tmp_path / "b", 3)
    real_finish, real_move = versions._finish, shutil.move
    moved = []

    def move_twice_then_die(src, dst):
        if len(moved) == 2:
            raise KeyboardInterrupt
        moved.append(src)
        return real_move(src, dst)

    def finish(root):  # add() finishes twice: first any earlier addition, last its own journal
        if (Path(root) / versions.PENDING).exists():
            monkeypatch.setattr(versions.shutil, "move", move_twice_then_die)
        try:
            return real_finish(root)
        finally:
            monkeypatch.setattr(versions.shutil, "move", real_move)

    monkeypatch.setattr(versions, "_finish", finish)
    with pytest.raises(KeyboardInterrupt):
        versions.add(fresh, data, progress=False)
    monkeypatch.setattr(versions, "_finish", real_finish)
    assert len(moved) == 2
    assert (data / versions.PENDING).exists()
    with pytest.raises(DataError, match=r"interrupted .* `d3n data add --finish"):
        versions.current(data)
    assert main(["data", "add", "--finish", "--to", str(data / "data.yaml")]) == 0  # the folder or its data.yaml
    assert "completed the interrupted addition: data version 2" in capsys.readouterr().out
    assert versions.current(data) == 2 and not (data / versions.PENDING).exists()
    assert not list(data.glob(".add-*"))
    layout = DatasetLayout.open(data)
    for i in range(3):
        img = data / "images" / "train" / f"new_synth_0000{i}.jpg"
        assert img.exists() and layout.labels(img).shape[1] == 5
    assert main(["data", "add", "--finish", "--to", str(data)]) == 0
    assert "no interrupted addition" in capsys.readouterr().out

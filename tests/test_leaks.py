"""splits.py and the leak check: the published split's two readings, scenes and footprints shared by splits,
`dataloader.py check`, and the one-line warning of training."""
import shutil

import numpy as np
import pytest
from geotiff import write_geotiff
from rasterio.transform import from_origin

import datalist
import dataloader as D
import files
import runtime
import scanning
import splits
import train_CR_kaggle as train

# The scenes the substring rule also puts in train (the published loaders' train entries "..._s1/s1_1", "s1_11",
# "s1_7", "s1_6", "s1_8" are prefixes of their folder names).
DOUBLED_TEST = {("ROIs1158_spring", 106), ("ROIs1158_spring", 123), ("ROIs1158_spring", 140),
                ("ROIs1868_summer", 119), ("ROIs1868_summer", 73), ("ROIs1970_fall", 139)}
DOUBLED_VAL = {("ROIs1970_fall", 65), ("ROIs1158_spring", 17), ("ROIs2017_winter", 84)}
UNLISTED = ("ROIs2017_winter", 5)  # in no published list: "s1_5/" starts no entry ("s1_55", "s1_59" are longer)


def _official_tree(root, scenes, patches=(1, 2)):
    """Empty files named and laid out as the official release (scan reads names only)."""
    for roi, n in scenes:
        for mod in ("s1", "s2", "s2_cloudy"):
            folder = root / f"{roi}_{mod}" / f"{mod}_{n}"
            folder.mkdir(parents=True, exist_ok=True)
            for p in patches:
                (folder / f"{roi}_{mod}_{n}_p{p}.tif").touch()


@pytest.fixture
def official_tree(tmp_path):
    scenes = (splits.scene_set(splits.OFFICIAL_TEST_SCENES) | splits.scene_set(splits.OFFICIAL_VAL_SCENES)
              | {("ROIs1158_spring", 1), ("ROIs2017_winter", 112), ("ROIs1868_summer", 100), UNLISTED})
    _official_tree(tmp_path / "data", scenes)
    return tmp_path / "data", scenes


def _scenes_by_split(rows):
    out = {1: set(), 2: set(), 3: set()}
    for t in rows:
        out[t.split].add(scanning.scene_of(t))
    return out


def test_substring_rule_moves_exactly_the_published_six_test_and_three_val_scenes_into_train(official_tree,
                                                                                             tmp_path, capsys):
    root, scenes = official_tree
    out = tmp_path / "substring.csv"
    assert D.main(["scan", str(root), "--out", str(out), "--split", "official-substring"]) == 0
    err = capsys.readouterr().err
    assert "split official-substring: the published loaders' rule" in err  # it says what it does
    assert "these test scenes are also in train: ROIs1158_spring 106, 123, 140; ROIs1868_summer 73, 119; " \
           "ROIs1970_fall 139" in err
    assert "these val scenes are also in train: ROIs1158_spring 17; ROIs1970_fall 65; ROIs2017_winter 84" in err
    assert "left out: ROIs2017_winter 5" in err
    rows = datalist.read_data_list(out)
    by_split = _scenes_by_split(rows)
    assert by_split[1] & by_split[3] == DOUBLED_TEST
    assert by_split[1] & by_split[2] == DOUBLED_VAL
    assert by_split[3] == splits.scene_set(splits.OFFICIAL_TEST_SCENES)
    assert by_split[2] == splits.scene_set(splits.OFFICIAL_VAL_SCENES)
    assert UNLISTED not in by_split[1] | by_split[2] | by_split[3]
    assert len(rows) == 2 * (len(scenes) - 1 + len(DOUBLED_TEST) + len(DOUBLED_VAL))  # one row per split, 2 patches
    assert splits.rule_of((t.split, *scanning.official_patch(t)) for t in rows) == "official-substring"

    exact = tmp_path / "exact.csv"
    assert D.main(["scan", str(root), "--out", str(exact), "--split", "official"]) == 0
    by_split = _scenes_by_split(datalist.read_data_list(exact))
    assert not (by_split[1] & by_split[2] or by_split[1] & by_split[3] or by_split[2] & by_split[3])
    assert UNLISTED in by_split[1]  # the exact rule trains every scene it does not name
    assert scanning.check_leaks(datalist.read_data_list(exact)).split_rule == "official"


def test_substring_rule_is_the_published_test_on_the_published_entries():
    assert [len(splits.SPLIT_ROIS[s]) for s in (1, 2, 3)] == [155, 10, 10]
    assert "ROIs1158_spring_s1/s1_1" in splits.SPLIT_ROIS[1] and "ROIs2017_winter_s1/s1_84" in splits.SPLIT_ROIS[2]
    # scenes of the same numbers in another region-season are not taken; the file name itself never matches
    assert splits.substring_splits(("ROIs1158_spring", 106), 5) == (1, 3)
    assert splits.substring_splits(("ROIs2017_winter", 106), 5) == ()
    assert splits.substring_splits(("ROIs1158_spring", 31), 5) == (3,)
    # a list that holds none of the nine scenes is the same split under both rules
    rows = [(3, ("ROIs2017_winter", 63), 1), (2, ("ROIs2017_winter", 22), 1), (1, ("ROIs2017_winter", 112), 1)]
    assert splits.rule_of(rows) == "official (= official-substring on these scenes)"
    assert splits.rule_of(rows[:2] + [(2, ("ROIs2017_winter", 112), 1)]) is None


def _patch(root, name, crs, x, y, size=8, pixel=10.0):
    """A one-band cloudy image named like the official release (the check reads its header only)."""
    roi, n, p = name
    rel = f"{roi}_s2_cloudy/s2_cloudy_{n}/{roi}_s2_cloudy_{n}_p{p}.tif"
    write_geotiff(root / rel, np.zeros((1, size, size), np.uint16), crs, from_origin(x, y, pixel, pixel))
    return rel


def _list(path, rows):
    """Kaggle 7-column list of (split, cloudy path); its S1 and cloud-free columns name the cloudy file too (the check
    opens every listed file's header and reads the footprint from the cloudy one)."""
    lines = ["split,s1_folder,s2_folder,s2_cloudy_folder,s2_filename,s1_filename,s2_cloudy_filename"]
    for split, rel in rows:
        folder, name = rel.rsplit("/", 1)
        lines.append(f"{split},{folder},{folder},{folder},{name},{name},{name}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def footprints(tmp_path):
    """80 m patches of distinct scenes: B overlaps A by 5 x 6 px, C touches A's edge, D has A's bounds in another CRS,
    E has no georeferencing."""
    root = tmp_path / "data"
    rel = {"A": _patch(root, ("ROIs2017_winter", 1, 1), "EPSG:32631", 0, 80),
           "B": _patch(root, ("ROIs2017_winter", 2, 1), "EPSG:32631", -30, 100),
           "C": _patch(root, ("ROIs2017_winter", 3, 1), "EPSG:32631", 80, 80),
           "D": _patch(root, ("ROIs2017_winter", 4, 1), "EPSG:32632", 0, 80),
           "E": _patch(root, ("ROIs2017_winter", 5, 1), None, 0, 80)}
    return root, rel


def test_check_finds_overlapping_footprints_of_different_scenes(footprints, tmp_path, capsys):
    root, rel = footprints
    missing = "ROIs2017_winter_s2_cloudy/s2_cloudy_6/ROIs2017_winter_s2_cloudy_6_p1.tif"  # a split not downloaded
    leaky = _list(tmp_path / "leaky.csv", [(1, rel["A"]), (3, rel["B"]), (2, rel["C"]), (2, rel["D"]), (3, rel["E"]),
                                           (3, missing)])
    report = scanning.check_leaks(datalist.read_data_list(leaky), root)
    assert report.shared == {}  # six scenes, one per patch
    assert report.overlaps == {(1, 3): (1, (rel["A"], rel["B"]))}  # C only touches A; D is in another CRS
    assert report.footprints == ("5 headers read, 4 georeferenced, 1 without georeferencing (not compared), "
                                 "1 triplet(s) with a listed file missing or unreadable (not checked)")
    assert report.leaks() and report.leaks([(1, 3)]) and not report.leaks([(1, 2), (2, 3)])
    assert report.not_checked() == [(1, 3), (2, 3)]  # the missing file is a test patch
    argv = ["check", str(leaky), "--input_data_folder", str(root)]
    assert D.main(argv) == 2 and D.main(argv + ["--strict"]) == 2  # a file not read: the check cannot pass
    out = capsys.readouterr().out
    assert f"train-test: 1 test patch overlap train patches (e.g. {rel['B']} and {rel['A']})" in out
    assert "train-val: no shared scene, no overlapping footprint" in out and "LEAK" in out
    assert "val-test: no shared scene, footprints NOT CHECKED (files not read)" in out
    assert f"NOT CHECKED: 1 triplet(s) of the test split not read (first: file not found: {root / missing})" in out
    found = _list(tmp_path / "found.csv", [(1, rel["A"]), (3, rel["B"]), (2, rel["C"]), (2, rel["D"]), (3, rel["E"])])
    assert D.main(["check", str(found), "--input_data_folder", str(root)]) == 0
    assert D.main(["check", str(found), "--input_data_folder", str(root), "--strict"]) == 1

    clean = _list(tmp_path / "clean.csv", [(1, rel["A"]), (2, rel["C"]), (3, rel["D"])])
    assert D.main(["check", str(clean), "--input_data_folder", str(root), "--strict"]) == 0
    assert "no leak found" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:--vgg_weights random")
def test_one_scene_in_two_splits_fails_check_strict_and_makes_training_warn_once(synthetic_dataset, tmp_path,
                                                                                capsys):
    root, csv_path = synthetic_dataset
    rows = datalist.read_data_list(csv_path)
    test_scene = scanning.scene_of(next(t for t in rows if t.split == 3))
    leaky = tmp_path / "leaky.csv"
    datalist.write_data_list(leaky, rows + [datalist.Triplet(1, t.s1, t.s2_cloudfree, t.s2_cloudy) for t in rows
                                     if scanning.scene_of(t) == test_scene])
    assert D.main(["check", str(leaky), "--input_data_folder", str(root), "--strict"]) == 1
    out = capsys.readouterr().out
    assert f"train-test: train and test share 1 scene ({scanning.format_scenes([test_scene])})" in out
    assert "split rule: scenes shared between splits" in out
    assert D.main(["check", str(csv_path), "--input_data_folder", str(root), "--strict"]) == 0

    def start(data_list):
        # A missing --resume checkpoint stops training right after the start-up checks: no step is needed here.
        argv = ["--data_list_filepath", str(data_list), "--input_data_folder", str(root), "--save_model_dir",
                str(tmp_path / "runs"), "--resume", str(tmp_path / "none.pth"), "--vgg_weights", "random",
                "--device", "cpu"]
        with pytest.raises(runtime.CheckpointError):
            train.main(argv)
        return [line for line in capsys.readouterr().err.splitlines() if "leaks" in line]

    warned = start(leaky)
    assert len(warned) == 1 and warned[0].startswith(f"warning: {leaky} leaks: train and test share 1 scene")
    assert "test patches overlap train patches" in warned[0]  # the same patches: their footprints coincide
    assert start(csv_path) == []


@pytest.mark.parametrize("strict", [[], ["--strict"]])
@pytest.mark.parametrize("broken", ["no_root", "html", "empty", "folder", "missing_s1"])
def test_a_check_that_could_not_read_its_files_fails_and_never_says_no_leak(footprints, tmp_path, capsys, broken,
                                                                           strict):
    root, rel = footprints
    clean = _list(tmp_path / "clean.csv", [(1, rel["A"]), (2, rel["C"]), (3, rel["D"])])
    assert D.main(["check", str(clean), "--input_data_folder", str(root), *strict]) == 0
    assert capsys.readouterr().out.endswith("no leak found\n")
    bad = root / rel["D"]
    if broken == "no_root":
        root = tmp_path / "nonexistent"
    elif broken == "folder":
        bad.unlink()
        bad.mkdir()
    elif broken == "missing_s1":  # the check opens every listed file, not only the cloudy image
        clean.write_text(clean.read_text().replace(f"3,{rel['D'].rsplit('/', 1)[0]},", "3,s1_gone,"))
    else:
        bad.write_bytes(b"" if broken == "empty" else b"<!DOCTYPE html><html>Access denied</html>")
    assert D.main(["check", str(clean), "--input_data_folder", str(root), *strict]) == 2
    captured = capsys.readouterr()
    assert "no leak found" not in captured.out
    if broken == "no_root":
        assert captured.err.strip() == f"error: --input_data_folder {root}: no such folder"
    else:
        cause = {"html": "web page", "empty": "empty (0 bytes)", "folder": "is a folder", "missing_s1": "not found"}
        assert "NOT CHECKED: 1 triplet(s) of the test split not read (first: " in captured.out
        assert cause[broken] in captured.out.splitlines()[-1]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:--vgg_weights random")
def test_training_start_checks_list_and_checkpoint_together_and_names_unchecked_pairs(synthetic_dataset, tmp_path,
                                                                                      capsys):
    root, csv_path = synthetic_dataset
    rows = datalist.read_data_list(csv_path)
    data = tmp_path / "data"
    shutil.copytree(root, data)
    runs = tmp_path / "runs"
    argv = ["--data_list_filepath", str(csv_path), "--input_data_folder", str(data), "--save_model_dir", str(runs),
            "--resume", str(tmp_path / "none.pth"), "--vgg_weights", "random", "--device", "cpu"]
    val_file = data / next(t for t in rows if t.split == 2).s2_cloudfree
    val_file.write_text("<html>quota exceeded</html>")  # a file training reads: refused with the checkpoint
    with pytest.raises(files.DataError) as e:
        train.main(argv)
    assert str(e.value).startswith(f"cannot open {val_file} as a raster: the file is a web page")
    assert str(e.value).endswith(f"; also: checkpoint not found: {tmp_path / 'none.pth'}")
    assert not runs.exists()
    shutil.copy(root / val_file.relative_to(data), val_file)
    test_file = data / next(t for t in rows if t.split == 3).s2_cloudy
    test_file.unlink()  # a split training does not read: its leak check is named as not done
    with pytest.raises(runtime.CheckpointError):
        train.main(argv)
    warned = [line for line in capsys.readouterr().err.splitlines() if "leak check" in line]
    assert warned == [f"warning: leak check of {csv_path} incomplete, train-test footprints not checked: 1 "
                      f"triplet(s) of the test split not read (first: file not found: {test_file})"]
    assert not runs.exists()

"""SEN12MS-CR splits: the published scene lists, the two rules that read them, and the leak check's geometry.

A scene is (region-season, number), e.g. ("ROIs1158_spring", 106); a patch is (scene, patch number). Nothing here
reads a file: dataloader.py maps list rows to scenes, reads the rasters' headers and prints; this module decides.

The scene lists are those of UnCRtainTS's SEN12MSCR loader (github.com/PatrickTUM/UnCRtainTS, data/dataLoader.py),
copied by ECRformer (data/sen12mscr_dataset.py) and HPN-CR (SEN12MS-CR/spilt.txt). That loader keeps a patch in a
split when `any(split_roi in path for split_roi in self.splits[split])`: a substring test on the patch's S1 path,
so its train entry "ROIs1158_spring_s1/s1_1" also takes test scenes spring 106, 123 and 140. Two rules read them:
- "official": the exact scene match (every scene named in no list trains);
- "official-substring": the published loaders' substring test, reproduced on the official path layout, so the
  same scenes land in two splits and scenes named in no list are in none.
"""
import math
from collections import defaultdict

SPLIT_IDS = {"train": 1, "val": 2, "test": 3}
SPLIT_NAMES = {v: k for k, v in SPLIT_IDS.items()}
SPLIT_PAIRS = ((1, 2), (1, 3), (2, 3))  # train-val, train-test, val-test

# UnCRtainTS data/dataLoader.py, class SEN12MSCR: self.splits["test"], ["val"], ["train"], in their order.
OFFICIAL_TEST_SCENES = {"ROIs1158_spring": (106, 123, 140, 31, 44), "ROIs1868_summer": (119, 73),
                        "ROIs1970_fall": (139,), "ROIs2017_winter": (108, 63)}
OFFICIAL_VAL_SCENES = {"ROIs2017_winter": (22, 107, 130, 84), "ROIs1868_summer": (19, 80, 127, 17),
                       "ROIs1970_fall": (65,), "ROIs1158_spring": (17,)}
OFFICIAL_TRAIN_SCENES = {
    "ROIs1970_fall": (3, 22, 148, 107, 1, 114, 135, 40, 42, 31, 149, 64, 28, 144, 57, 35, 133, 30, 134, 141, 112, 116,
                      37, 26, 77, 100, 83, 71, 93, 119, 104, 136, 6, 41, 125, 91, 131, 120, 110, 19, 14, 81, 39, 109,
                      33, 88, 11, 128, 142, 122, 4, 27, 147, 85, 82, 105),
    "ROIs1158_spring": (9, 1, 124, 40, 101, 21, 134, 145, 141, 66, 8, 26, 77, 113, 100, 117, 119, 6, 58, 120, 110, 126,
                        115, 121, 39, 109, 63, 75, 132, 128, 142, 15, 45, 97, 147),
    # summer 100 comes last in their list, with a note that SEN12MS-CR-TS tests on it
    "ROIs1868_summer": (90, 87, 25, 124, 114, 135, 40, 101, 42, 31, 36, 139, 56, 133, 55, 43, 113, 76, 123, 143, 93,
                        125, 89, 120, 126, 72, 115, 121, 146, 140, 95, 102, 7, 11, 132, 15, 137, 4, 27, 147, 86, 47,
                        100),
    "ROIs2017_winter": (68, 25, 62, 135, 42, 64, 21, 55, 112, 116, 8, 59, 49, 104, 81, 146, 75, 94, 102, 61, 47),
}
_TABLES = {1: OFFICIAL_TRAIN_SCENES, 2: OFFICIAL_VAL_SCENES, 3: OFFICIAL_TEST_SCENES}

SPLIT_RULES = {
    "official": "exact scene match against the published test and validation scene lists; every other scene trains",
    "official-substring": "the published loaders' rule (UnCRtainTS, ECRformer): a patch is in a split when one of "
                          "that split's entries such as 'ROIs1158_spring_s1/s1_1' is a substring of its S1 path, so "
                          "test scenes spring 106, 123, 140, summer 119, 73, fall 139 and validation scenes fall 65, "
                          "spring 17, winter 84 are also in train, and scenes in no list are in no split",
}


def scene_set(table):
    return {(roi, n) for roi, numbers in table.items() for n in numbers}


_OFFICIAL_TEST, _OFFICIAL_VAL = scene_set(OFFICIAL_TEST_SCENES), scene_set(OFFICIAL_VAL_SCENES)


def official_split(scene):
    """Split id of a scene under the exact rule: 3 test, 2 validation, 1 every other scene."""
    return 3 if scene in _OFFICIAL_TEST else 2 if scene in _OFFICIAL_VAL else 1


def official_s1_path(scene, patch):
    """The S1 path, relative to the data root, that the published loaders test: ROI_s1/s1_N/ROI_s1_N_pP.tif."""
    roi, n = scene
    return f"{roi}_s1/s1_{n}/{roi}_s1_{n}_p{patch}.tif"


# The published loaders' split entries, "ROIs1158_spring_s1/s1_1", rebuilt from the tables above.
SPLIT_ROIS = {split: [f"{roi}_s1/s1_{n}" for roi, numbers in table.items() for n in numbers]
              for split, table in _TABLES.items()}


def substring_splits(scene, patch):
    """Split ids (ascending, possibly none) that the published loaders put a patch in: one instance per split, each
    keeping a patch when `any(split_roi in path for split_roi in split_rois)` on its official S1 path."""
    path = official_s1_path(scene, patch)
    return tuple(split for split in (1, 2, 3) if any(split_roi in path for split_roi in SPLIT_ROIS[split]))


def rule_of(rows):
    """Which published rule made a list: rows are (split, scene, patch) of officially named files. Returns
    "official", "official-substring", "official (= official-substring on these scenes)" or None."""
    listed = set(rows)
    patches = {(scene, patch) for _, scene, patch in listed}
    exact = {(official_split(scene), scene, patch) for scene, patch in patches}
    substring = {(split, scene, patch) for scene, patch in patches for split in substring_splits(scene, patch)}
    if not listed or listed not in (exact, substring):
        return None
    if exact == substring:
        return "official (= official-substring on these scenes)"
    return "official" if listed == exact else "official-substring"


def shared_scenes(rows):
    """{(split a, split b): sorted scenes in both} for each pair of SPLIT_PAIRS sharing one; rows: (split, scene)."""
    by_split = defaultdict(set)
    for split, scene in rows:
        by_split[split].add(scene)
    out = {pair: sorted(by_split[pair[0]] & by_split[pair[1]], key=str) for pair in SPLIT_PAIRS}
    return {pair: scenes for pair, scenes in out.items() if scenes}


def overlapping_footprints(items):
    """Patches of different splits whose footprints overlap by at least half a pixel on both axes (touching edges
    share no pixel). items: (split, crs, (left, bottom, right, top), pixel size); crs None = not georeferenced,
    skipped. Returns {(split a, split b): sorted [(index of the split-a item, index of the split-b item)]}.
    Boxes are hashed into a grid of cells as large as the largest box, so each is compared with its neighbours only."""
    groups = defaultdict(list)
    for i, (_split, crs, _box, _pixel) in enumerate(items):
        if crs is not None:
            groups[crs].append(i)
    found = set()
    for members in groups.values():
        cell = max(max(items[i][2][2] - items[i][2][0], items[i][2][3] - items[i][2][1]) for i in members) or 1.0
        grid = defaultdict(list)
        for i in members:
            left, bottom, right, top = items[i][2]
            for cx in range(math.floor(left / cell), math.floor(right / cell) + 1):
                for cy in range(math.floor(bottom / cell), math.floor(top / cell) + 1):
                    grid[cx, cy].append(i)
        for bucket in grid.values():
            found.update(_overlaps_in(bucket, items))
    out = defaultdict(list)
    for i, j in sorted(found):
        out[items[i][0], items[j][0]].append((i, j))
    return dict(out)


def _overlaps_in(bucket, items):
    """(i, j) with split(i) < split(j) of the bucket's boxes that overlap by at least half a pixel on both axes."""
    for a in range(len(bucket)):
        i = bucket[a]
        for j in bucket[a + 1:]:
            if items[i][0] == items[j][0]:
                continue
            i2, j2 = (i, j) if items[i][0] < items[j][0] else (j, i)
            (l1, b1, r1, t1), (l2, b2, r2, t2) = items[i][2], items[j][2]
            tolerance = 0.5 * min(items[i][3], items[j][3])
            if min(r1, r2) - max(l1, l2) > tolerance and min(t1, t2) - max(b1, b2) > tolerance:
                yield i2, j2


# SEN12MS-CR-TS: UnCRtainTS data/dataLoader.py, class SEN12MSCRTS, region "all": its ROI table (self.ROI) and
# self.splits["test"] (13 ROIs "across continents") and ["val"] (5), in their order; every other ROI trains. That
# loader keeps a ROI when `os.path.join(roi_dir, roi) in self.splits[split]`: list membership, an exact match, so
# the substring leak of the mono-temporal loader does not arise here.
OFFICIAL_TS_ROIS = {
    "ROIs1158": ("106",),
    "ROIs1868": ("17", "36", "56", "73", "85", "100", "114", "119", "121", "126", "127", "139", "142", "143"),
    "ROIs1970": ("20", "21", "35", "40", "57", "65", "71", "82", "83", "91", "112", "116", "119", "128", "132", "133",
                 "135", "139", "142", "144", "149"),
    "ROIs2017": ("8", "22", "25", "32", "49", "61", "63", "69", "75", "103", "108", "115", "116", "117", "130", "140",
                 "146"),
}
OFFICIAL_TS_TEST_ROIS = ("ROIs1868/119", "ROIs1970/139", "ROIs2017/108", "ROIs2017/63", "ROIs1158/106",
                         "ROIs1868/73", "ROIs2017/32", "ROIs1868/100", "ROIs1970/132", "ROIs2017/103", "ROIs1868/142",
                         "ROIs1970/20", "ROIs2017/140")
OFFICIAL_TS_VAL_ROIS = ("ROIs2017/22", "ROIs1970/65", "ROIs2017/117", "ROIs1868/127", "ROIs1868/17")


def official_ts_split(roi):
    """Split id of a SEN12MS-CR-TS ROI ("ROIs1970/20") under the published lists: 3 test, 2 val, 1 any other."""
    return 3 if roi in OFFICIAL_TS_TEST_ROIS else 2 if roi in OFFICIAL_TS_VAL_ROIS else 1

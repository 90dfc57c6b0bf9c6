"""Scanning a downloaded copy into triplets (or SEN12MS-CR-TS time series), the scene each belongs to, splitting
them by scene (random or the published lists), and the leak check (scenes and footprints shared by splits,
`python dataloader.py check`)."""
import dataclasses
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import rasterio

import splits
from datalist import TimeSeries, Triplet, read_data_list
from files import DataError
from rasters import GDAL_READ_OPTIONS, data_root, open_raster
from splits import OFFICIAL_TEST_SCENES, OFFICIAL_VAL_SCENES, SPLIT_IDS, SPLIT_NAMES

# ---------------------------------------------------------------------------------------------------------------
# Scanning a downloaded copy (official layout, any nesting depth)

_FILE_RE = re.compile(r"^(ROIs\d+_[a-z]+)_(s1|s2|s2_cloudy)_(\d+)_p(\d+)\.tif$", re.IGNORECASE)
# GLF-CR's layout: one folder per modality side by side, the same file name in each (ROIs2017_winter_112_p797.tif).
_GLFCR_NAME_RE = re.compile(r"^(ROIs\d+_[a-z]+)_(\d+)_p(\d+)\.tif$", re.IGNORECASE)
GLFCR_FOLDERS = {"s1": "s1", "s2": "s2", "s2_cloudfree": "s2", "s2_cloudy": "s2_cloudy"}
LAYOUTS_READ = ("the official layout at any depth, Kaggle's nesting included (ROIs2017_winter_s1/s1_112/"
                "ROIs2017_winter_s1_112_p797.tif with its _s2_ and _s2_cloudy_ partners), and GLF-CR's (folders s1/, "
                "s2_cloudfree/ or s2/, and s2_cloudy/ side by side holding the same file names)")


def scan_folder(root):
    """Find triplets under `root` in either layout of LAYOUTS_READ. Returns (triplets with split 0, relative paths
    of files whose partners are missing, relative paths of .tif files that fit neither layout). Official names are
    matched by (region-season, scene, patch) at any depth, GLF-CR's by folder and file name."""
    root = data_root(root, "data root")
    found, unrecognised = {}, []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        folder = os.path.basename(dirpath).lower()
        for fn in sorted(filenames):
            if not fn.lower().endswith((".tif", ".tiff")):
                continue
            rel = os.path.relpath(os.path.join(dirpath, fn), root)
            m = _FILE_RE.match(fn)
            if m:
                key, mod = ("official", m.group(1), int(m.group(3)), int(m.group(4))), m.group(2).lower()
            elif folder in GLFCR_FOLDERS and dirpath != str(root):
                key, mod = ("glfcr", os.path.dirname(os.path.dirname(rel)), fn), GLFCR_FOLDERS[folder]
            else:
                unrecognised.append(rel)
                continue
            found.setdefault(key, {}).setdefault(mod, rel)  # first copy wins (sorted walk)
    triplets, unpartnered = [], []
    for key in sorted(found):
        mods = found[key]
        if set(mods) == {"s1", "s2", "s2_cloudy"}:
            triplets.append(Triplet(0, mods["s1"], mods["s2"], mods["s2_cloudy"]))
        else:
            unpartnered.extend(sorted(mods.values()))
    return triplets, unpartnered, unrecognised


def scan_layout(root):
    """Find triplets under `root` (scan_folder). Returns (triplets with split 0, list of unpartnered relative
    paths)."""
    return scan_folder(root)[:2]


def _named_patch(path):
    """(region-season, scene, patch) from an official or a GLF-CR file name, else None."""
    name = os.path.basename(path)
    m = _FILE_RE.match(name)
    if m:
        return m.group(1), int(m.group(3)), int(m.group(4))
    m = _GLFCR_NAME_RE.match(name)
    return (m.group(1), int(m.group(2)), int(m.group(3))) if m else None


def scene_of(triplet):
    """(region-season, scene number) of a triplet named in the official (or GLF-CR's) way, else its cloudy file's
    folder."""
    named = _named_patch(triplet.s2_cloudy)
    return named[:2] if named else (os.path.dirname(triplet.s2_cloudy), 0)


def split_by_scene(triplets, val_frac=0.1, test_frac=0.1, seed=0):
    """Assign split 1/2/3 per scene (never per patch: neighbouring patches of a scene overlap). The scene order
    is shuffled with `seed`; val and test each get at least one scene when their fraction is > 0 and there
    are at least three scenes."""
    split_of = _split_of_groups({scene_of(t) for t in triplets}, val_frac, test_frac, seed)
    return [Triplet(split_of.get(scene_of(t), 1), t.s1, t.s2_cloudfree, t.s2_cloudy) for t in triplets]


def _split_of_groups(groups, val_frac, test_frac, seed):
    """{group: 2 or 3} for the groups (scenes, ROIs) drawn into val and test; the others train."""
    if not 0 <= val_frac < 1 or not 0 <= test_frac < 1 or val_frac + test_frac >= 1:
        raise ValueError(f"need 0 <= val_frac, test_frac and val_frac + test_frac < 1, got {val_frac}, {test_frac}")
    groups = sorted(groups)
    random.Random(seed).shuffle(groups)
    n = len(groups)
    n_test, n_val = round(test_frac * n), round(val_frac * n)
    if n >= 3:
        n_test, n_val = max(n_test, 1 if test_frac > 0 else 0), max(n_val, 1 if val_frac > 0 else 0)
    split_of = {g: 3 for g in groups[:n_test]}
    split_of.update({g: 2 for g in groups[n_test:n_test + n_val]})
    return split_of


def official_patch(triplet):
    """((region-season, scene), patch) of a triplet named in the official way, else None."""
    named = _named_patch(triplet.s2_cloudy)
    return (named[:2], named[2]) if named else None


def split_official(triplets):
    """Assign split 1/2/3 by the published scene lists, scenes matched exactly (splits.py, rule "official").
    Returns (triplets, missing) where missing maps "test" and "val" to the official scenes of that split not among
    the triplets (a partial download), in list order."""
    present = {scene_of(t) for t in triplets}
    missing = {name: [(roi, n) for roi, scenes in table.items() for n in scenes if (roi, n) not in present]
               for name, table in (("test", OFFICIAL_TEST_SCENES), ("val", OFFICIAL_VAL_SCENES))}
    return [Triplet(splits.official_split(scene_of(t)), t.s1, t.s2_cloudfree, t.s2_cloudy) for t in triplets], missing


def split_official_substring(triplets):
    """The published loaders' substring rule (splits.substring_splits on each patch's official S1 path): one row per
    split a patch falls in, so a patch may be listed twice and a scene in no list is dropped. Returns (rows,
    doubled, dropped): doubled maps "val" and "test" to their scenes that are also in train; dropped lists the
    scenes in no split."""
    rows, doubled, dropped = [], {"val": set(), "test": set()}, set()
    for t in triplets:
        scene, patch = official_patch(t)
        in_splits = splits.substring_splits(scene, patch)
        rows += [Triplet(split, t.s1, t.s2_cloudfree, t.s2_cloudy) for split in in_splits]
        for split in in_splits[1:] if in_splits[:1] == (1,) else ():
            doubled[SPLIT_NAMES[split]].add(scene)
        if not in_splits:
            dropped.add(scene)
    return rows, {k: sorted(v) for k, v in doubled.items()}, sorted(dropped)


def format_scenes(scenes):
    """[(roi, n), ...] -> "ROIs1158_spring 106, 123; ROIs1970_fall 139" (as the scene lists are written)."""
    by_roi = {}
    for roi, n in scenes:
        by_roi.setdefault(roi, []).append(str(n))
    return "; ".join(f"{roi} {', '.join(ns)}" for roi, ns in by_roi.items())


# ---------------------------------------------------------------------------------------------------------------
# SEN12MS-CR-TS: ROOT/ROIs1970/20/S2/0/s2_ROIs1970_20_ImgNo_0_2018-01-02_patch_12.tif (and S1/), at any depth

_TS_FILE_RE = re.compile(r"^(s1|s2)_(ROIs\d+)_(\d+)_ImgNo_(\d+)_(\d{4}-\d{2}-\d{2})_patch_(\d+)\.tif$",
                         re.IGNORECASE)
TS_LAYOUT = ("SEN12MS-CR-TS's layout at any depth: ROIs1970/20/S1/0/s1_ROIs1970_20_ImgNo_0_<date>_patch_12.tif and "
             "ROIs1970/20/S2/0/s2_ROIs1970_20_ImgNo_0_<date>_patch_12.tif, date folders 0..29")
TS_SIDE_CARS = ("cloud_truth_",)  # synthetic series' true cloud maps (rasters.ts_truth_path): known, not listed


def scan_ts_folder(root):
    """Find SEN12MS-CR-TS series under `root` (TS_LAYOUT, matched by file name at any depth): the files of one ROI's
    patch across its dates, aligned by patch number, the date the sixth `_` field of the S2 name. Returns (series
    with split 0, lines naming each incomplete series and what it lacks, relative paths of .tif files named neither
    way). A series is complete when it has S1 and S2 at every date index any patch of its ROI has."""
    root = data_root(root, "data root")
    found, unrecognised = {}, []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for fn in sorted(filenames):
            if not fn.lower().endswith((".tif", ".tiff")) or fn.startswith(TS_SIDE_CARS):
                continue
            rel = os.path.relpath(os.path.join(dirpath, fn), root)
            m = _TS_FILE_RE.match(fn)
            if not m:
                unrecognised.append(rel)
                continue
            mod, roi = m.group(1).lower(), f"{m.group(2)}/{m.group(3)}"
            t, date, patch = int(m.group(4)), m.group(5), int(m.group(6))
            found.setdefault((roi, patch), {}).setdefault(t, {}).setdefault(mod, (rel, date))  # first copy wins
    dates_of_roi = {}
    for (roi, _), by_t in found.items():
        dates_of_roi.setdefault(roi, set()).update(by_t)
    series, incomplete = [], []
    for (roi, patch), by_t in sorted(found.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        wanted = sorted(dates_of_roi[roi])
        lacks = [f"no {mod.upper()} at t={', '.join(str(t) for t in wanted if mod not in by_t.get(t, {}))}"
                 for mod in ("s1", "s2") if any(mod not in by_t.get(t, {}) for t in wanted)]
        if lacks:
            incomplete.append(f"incomplete series {roi} patch {patch}: {'; '.join(lacks)} (of t={wanted[0]}.."
                              f"{wanted[-1]}; left out)")
            continue
        series.append(TimeSeries(0, roi, patch, tuple(by_t[t]["s1"][0] for t in wanted),
                                 tuple(by_t[t]["s2"][0] for t in wanted), tuple(by_t[t]["s2"][1] for t in wanted),
                                 tuple(wanted)))
    return series, incomplete, unrecognised


def split_ts_by_roi(series, val_frac=0.1, test_frac=0.1, seed=0):
    """Split 1/2/3 per ROI (patches of a ROI overlap and share dates), ROIs shuffled with `seed` as split_by_scene
    shuffles scenes."""
    split_of = _split_of_groups({s.roi for s in series}, val_frac, test_frac, seed)
    return [dataclasses.replace(s, split=split_of.get(s.roi, 1)) for s in series]


def split_ts_official(series):
    """Split 1/2/3 by the published SEN12MS-CR-TS lists (splits.official_ts_split). Returns (series, missing): missing
    maps "test" and "val" to the official ROIs of that split not among the series, in list order."""
    present = {s.roi for s in series}
    missing = {name: [roi for roi in rois if roi not in present] for name, rois in
               (("test", splits.OFFICIAL_TS_TEST_ROIS), ("val", splits.OFFICIAL_TS_VAL_ROIS))}
    return [dataclasses.replace(s, split=splits.official_ts_split(s.roi)) for s in series], missing


# ---------------------------------------------------------------------------------------------------------------
# Leak check: scenes and footprints shared by splits (`python dataloader.py check`)

# Lists up to this many triplets get their footprints checked when training or evaluation starts (one header read
# each, about 1 ms on a local disk); larger ones get the scene check there and `dataloader.py check` reads them all.
AUTO_FOOTPRINT_LIMIT = 5000


@dataclass
class LeakReport:
    """What `check_leaks` found. shared: {(split a, split b): scenes in both}; overlaps: {(a, b): (number of split-b
    patches whose footprint overlaps a split-a patch, one example pair of paths)}, None when footprints were not
    read; footprints: how they were read (or why not); split_rule: splits.rule_of for officially named lists, else
    a description."""
    source: str
    counts: dict
    n_scenes: int
    shared: dict
    overlaps: object
    footprints: str
    split_rule: str
    unread: list = field(default_factory=list)  # (split, message naming the file) of triplets not read

    def not_checked(self, pairs=splits.SPLIT_PAIRS):
        """The pairs of splits whose footprint check is incomplete: a file of one of the two could not be read."""
        bad = {split for split, _ in self.unread}
        return [pair for pair in pairs if bad & set(pair)]

    def unread_text(self, splits_wanted=(1, 2, 3)):
        """'N triplet(s) of the test split not read (first: MESSAGE)', or "" when every one was read."""
        unread = [(split, message) for split, message in self.unread if split in splits_wanted]
        if not unread:
            return ""
        names = "/".join(SPLIT_NAMES[s] for s in sorted({split for split, _ in unread}))
        return f"{len(unread)} triplet(s) of the {names} split not read (first: {unread[0][1]})"

    def leaks(self, pairs=splits.SPLIT_PAIRS):
        return any(p in self.shared or (self.overlaps and p in self.overlaps) for p in pairs)

    def pair_text(self, pair):
        """What leaks between two splits, in words; "" when nothing does."""
        a, b = SPLIT_NAMES[pair[0]], SPLIT_NAMES[pair[1]]
        parts = []
        if pair in self.shared:
            scenes = self.shared[pair]
            parts.append(f"{a} and {b} share {len(scenes)} scene{'s' * (len(scenes) > 1)} ({format_scenes(scenes)})")
        if self.overlaps and pair in self.overlaps:
            n, (pa, pb) = self.overlaps[pair]
            parts.append(f"{n} {b} patch{'es' * (n > 1)} overlap {a} patches (e.g. {pb} and {pa})")
        return "; ".join(parts)

    def to_json(self):
        pairs = {f"{SPLIT_NAMES[a]}-{SPLIT_NAMES[b]}": {
            "shared_scenes": [f"{roi} {n}" for roi, n in self.shared.get((a, b), [])],
            "overlapping_patches": None if self.overlaps is None else self.overlaps.get((a, b), (0, None))[0]}
            for a, b in splits.SPLIT_PAIRS}
        return {"data_list": self.source, "leak": self.leaks(), "pairs": pairs, "footprints": self.footprints,
                "split_rule": self.split_rule,
                "not_checked": [f"{SPLIT_NAMES[a]}-{SPLIT_NAMES[b]}" for a, b in self.not_checked()],
                "unread": self.unread_text() or None}


def read_footprints(triplets, root, progress=False):
    """(boxes, unread): boxes[i] is (crs, (left, bottom, right, top), pixel size) of triplet i's cloudy image, from
    its header only, crs None for a raster without georeferencing, None where one of the triplet's three files is
    missing or cannot be opened; unread lists (index, message naming the file) of those. Every file is opened (headers
    only), so a report says "not checked" for what it could not read. The three files of a triplet share a grid
    (check_triplet)."""
    from tqdm.auto import tqdm

    boxes, unread = [], []
    with rasterio.Env(**GDAL_READ_OPTIONS):
        for i, t in enumerate(tqdm(triplets, desc="headers", disable=not progress, dynamic_ncols=True)):
            try:
                for rel in (t.s1, t.s2_cloudfree):
                    open_raster(Path(root) / rel).close()
                with open_raster(Path(root) / t.s2_cloudy) as src:
                    georeferenced = src.crs is not None and not src.transform.is_identity
                    boxes.append((src.crs.to_string() if georeferenced else None, tuple(src.bounds),
                                  min(abs(src.transform.a), abs(src.transform.e))))
            except DataError as e:
                boxes.append(None)
                unread.append((i, str(e)))
    return boxes, unread


def check_leaks(triplets, root=None, source="data list", progress=False):
    """The leak check: scenes shared by two splits (scene_of: official names, else the cloudy file's folder) and,
    with `root`, footprints of patches of two splits that overlap (same CRS, bounds overlapping by at least half a
    pixel; headers only, no pixels). Returns a LeakReport; its `unread` names the files it could not read."""
    shared = splits.shared_scenes((t.split, scene_of(t)) for t in triplets)
    overlaps, footprints, unread = None, "not read (no data root given)", []
    if root is not None:
        data_root(root)
        boxes, problems = read_footprints(triplets, root, progress)
        unread = [(triplets[i].split, message) for i, message in problems]
        found = splits.overlapping_footprints([(t.split, *(box or (None, None, None))) for t, box in
                                               zip(triplets, boxes)])
        overlaps = {pair: (len({j for _, j in ij}), (triplets[ij[0][0]].s2_cloudy, triplets[ij[0][1]].s2_cloudy))
                    for pair, ij in found.items()}
        n_read = sum(box is not None for box in boxes)
        n_geo = sum(box is not None and box[0] is not None for box in boxes)
        footprints = f"{n_read} headers read, {n_geo} georeferenced" + (
            f", {n_read - n_geo} without georeferencing (not compared)" if n_geo < n_read else "") + (
            f", {len(boxes) - n_read} triplet(s) with a listed file missing or unreadable (not checked)"
            if n_read < len(boxes) else "")
    return LeakReport(source, {name: sum(t.split == i for t in triplets) for name, i in SPLIT_IDS.items()},
                      len({scene_of(t) for t in triplets}), shared, overlaps, footprints, _split_rule(triplets, shared),
                      unread)


def _split_rule(triplets, shared):
    named = [official_patch(t) for t in triplets]
    if all(named):
        rule = splits.rule_of((t.split, scene, patch) for t, (scene, patch) in zip(triplets, named))
        if rule:
            return rule
    return "by scene, not the published lists" if not shared else "scenes shared between splits (not by scene)"


def startup_leak_check(csv_path, root):
    """The check that training and evaluation run as they start: scenes always, footprints of lists up to
    AUTO_FOOTPRINT_LIMIT triplets (the report says when they were not read, and why)."""
    triplets = read_data_list(csv_path)
    small = len(triplets) <= AUTO_FOOTPRINT_LIMIT
    report = check_leaks(triplets, root if small else None, source=str(csv_path))
    if not small:
        report.footprints = (f"not read at start-up: {len(triplets)} triplets > {AUTO_FOOTPRINT_LIMIT}; run "
                             f"python dataloader.py check {csv_path} --input_data_folder {root}")
    return report


def leak_warning(report, pairs, root):
    """A line naming what leaks between `pairs` of splits, and one naming the pairs whose footprints could not all be
    read ("not checked"); None when nothing leaks and everything was read."""
    lines = []
    texts = [report.pair_text(pair) for pair in pairs if report.leaks([pair])]
    if texts:
        lines.append(f"warning: {report.source} leaks: {'; '.join(texts)}; scores on those splits are inflated "
                     f"(details: python dataloader.py check {report.source} --input_data_folder {root})")
    unchecked = report.not_checked(pairs)
    if unchecked:
        names = ", ".join(f"{SPLIT_NAMES[a]}-{SPLIT_NAMES[b]}" for a, b in unchecked)
        lines.append(f"warning: leak check of {report.source} incomplete, {names} footprints not checked: "
                     f"{report.unread_text(sorted({s for pair in unchecked for s in pair}))}")
    return "\n".join(lines) or None

"""The data lists: Triplet and TimeSeries, and reading, selecting and writing the list files (GLF-CR 5-column, Kaggle
7-column, the time-series list)."""
import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path

from files import DataError, atomic_output
from splits import SPLIT_IDS, SPLIT_NAMES

KAGGLE_HEADER = ("split", "s1_folder", "s2_folder", "s2_cloudy_folder", "s2_filename", "s1_filename",
                 "s2_cloudy_filename")


@dataclass(frozen=True)
class Triplet:
    """One co-registered sample; paths are relative to the data root, as written in the list file."""
    split: int
    s1: str
    s2_cloudfree: str
    s2_cloudy: str

    @property
    def name(self):
        """Stem of the cloudy S2 file: names the outputs written for this sample."""
        return Path(self.s2_cloudy).stem


# The list formats read, for the one error that names what a file is when it is none of them.
LIST_FORMATS = ("GLF-CR 5 columns (split, s1_folder, s2_folder, s2_cloudy_folder, file name) or Kaggle 7 columns "
                "(split, s1_folder, s2_folder, s2_cloudy_folder, s2_filename, s1_filename, s2_cloudy_filename); "
                "comma, tab or semicolon separated, header row and pandas index column optional")
SPLIT_WORDS = {"train": 1, "val": 2, "validation": 2, "test": 3}  # some lists spell the split out
# What a file that is not a text list is, from its first bytes: a data list passed where something else was meant.
_NOT_TEXT = ((b"PK\x03\x04", "a ZIP archive or Excel workbook (save it as CSV)"), (b"\x1f\x8b", "a gzip archive"),
             (b"II*\x00", "a TIFF image"), (b"MM\x00*", "a TIFF image"), (b"\x80", "a Python pickle"),
             (b"\x93NUMPY", "a NumPy array"), (b"\x89HDF", "an HDF5 file"), (b"%PDF", "a PDF document"))


def row_to_triplet(row, where):
    """A 5-column GLF-CR or 7-column Kaggle row -> Triplet; `where` ("file:line") goes into errors."""
    row = [c.strip() for c in row]
    if len(row) == 5:
        split, s1_dir, s2_dir, cloudy_dir, name = row
        s1, s2, cloudy = (os.path.join(d, name) for d in (s1_dir, s2_dir, cloudy_dir))
    elif len(row) == 7:
        split, s1_dir, s2_dir, cloudy_dir, s2_name, s1_name, cloudy_name = row
        s1, s2, cloudy = os.path.join(s1_dir, s1_name), os.path.join(s2_dir, s2_name), \
            os.path.join(cloudy_dir, cloudy_name)
    else:
        raise DataError(f"{where}: expected 5 columns (GLF-CR) or 7 columns (Kaggle), got {len(row)}: {row}")
    split = str(SPLIT_WORDS.get(split.lower(), split))
    if split not in ("1", "2", "3"):
        raise DataError(f"{where}: split must be 1 (train), 2 (val) or 3 (test), got {split!r}")
    if not all(row[1:]):
        raise DataError(f"{where}: empty folder or file name in {row}")
    return Triplet(int(split), s1, s2, cloudy)


def _list_text(csv_path):
    """The text of a list file (a UTF-8 byte-order mark dropped, any line ending); DataError naming what the file is
    when it is not a text list at all."""
    if csv_path.is_dir():
        raise DataError(f"data list {csv_path} is a folder; pass the CSV file (to list a folder of GeoTIFFs: python "
                        f"dataloader.py scan {csv_path} --out data.csv)")
    if not csv_path.is_file():
        raise DataError(f"data list not found: {csv_path}")
    raw = csv_path.read_bytes()
    seen = next((what for magic, what in _NOT_TEXT if raw.startswith(magic)), None)
    if seen is None and b"\x00" in raw[:4096]:
        seen = "a binary file"
    try:
        text = None if seen else raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        try:  # Excel on Windows saves "CSV" in the locale's code page
            text = raw.decode("cp1252")
        except UnicodeDecodeError:
            seen = "a binary file"
    head = (text or "").lstrip().lower()
    if head.startswith(("<!doctype html", "<html", "<?xml")):
        seen = "an HTML or XML page (a download that returned a web page?)"
    elif head.startswith(("{", "[")):
        seen = "a JSON file"
    if seen:
        raise DataError(f"data list {csv_path} is {seen}, not a list; read: {LIST_FORMATS}")
    return text


def _list_delimiter(first_line):
    """The separator of a list from its first line: comma, else tab, else semicolon (Excel in many locales)."""
    return next((d for d in (",", "\t", ";") if d in first_line), ",")


def read_data_list(csv_path):
    """Read a GLF-CR 5-column or Kaggle 7-column list (comma, tab or semicolon separated; header row, pandas' index
    column, a byte-order mark and CRLF line ends allowed; split 1/2/3 or train/val/test). A file in another format is
    one DataError saying what it looks like and which formats are read."""
    csv_path = Path(csv_path)
    lines = _list_text(csv_path).splitlines()
    first = next((line for line in lines if line.strip()), "")
    rows = [(lineno, row) for lineno, row in enumerate(csv.reader(lines, delimiter=_list_delimiter(first)), start=1)
            if row and "".join(row).strip()]
    index_column = False
    # Only the first non-blank line may be a header: words, no split id, no file name.
    if rows and not _is_split(rows[0][1][0]) and not any(c.strip().lower().endswith((".tif", ".tiff"))
                                                         for c in rows[0][1]):
        header = [c.strip() for c in rows.pop(0)[1]]
        if tuple(header) == TS_HEADER:
            raise DataError(f"{csv_path}: a time-series list (SEN12MS-CR-TS), not a list of triplets; read it with "
                            f"read_ts_list (training and evaluation: --input_t 2 or more)")
        # pandas' to_csv without index=False writes an unnamed first column of row numbers
        index_column = len(header) in (6, 8) and header[0] in ("", "Unnamed: 0", "index")
    if rows and all(len(row) == 1 for _, row in rows):
        lineno, row = rows[0]
        raise DataError(f"{csv_path}:{lineno}: one name per line ({row[0].strip()!r}), like a split file of patch "
                        f"or scene names: a data list needs each triplet's split and three files; write one with "
                        f"python dataloader.py scan ROOT --out data.csv. Read: {LIST_FORMATS}")
    triplets = []
    for lineno, row in rows:
        where = f"{csv_path}:{lineno}"
        if len(row) not in (5, 7) and not index_column:
            raise DataError(f"{where}: expected 5 columns (GLF-CR) or 7 columns (Kaggle), got {len(row)}: "
                            f"{[c.strip() for c in row]}; read: {LIST_FORMATS}")
        triplets.append(row_to_triplet(row[1:] if index_column else row, where))
    if not triplets:
        raise DataError(f"{csv_path}: no data rows")
    return triplets


def _is_split(cell):
    cell = cell.strip().lower()
    return cell.isdigit() or cell in SPLIT_WORDS


def select_split(triplets, split, source="data list"):
    """Rows of one split ("train"/"val"/"test" or 1/2/3); an empty split is an error naming `source`."""
    split_id = SPLIT_IDS.get(split, split)
    if split_id not in SPLIT_NAMES:
        raise ValueError(f"unknown split {split!r}; use train, val, test or 1, 2, 3")
    rows = [t for t in triplets if t.split == split_id]
    if not rows:
        raise DataError(f"{source}: no rows with split {split_id} ({SPLIT_NAMES[split_id]})")
    return rows


def write_data_list(path, triplets):
    """Write the Kaggle 7-column format with a header, atomically."""
    with atomic_output(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(KAGGLE_HEADER)
        for t in triplets:
            w.writerow([t.split, os.path.dirname(t.s1), os.path.dirname(t.s2_cloudfree),
                        os.path.dirname(t.s2_cloudy), os.path.basename(t.s2_cloudfree),
                        os.path.basename(t.s1), os.path.basename(t.s2_cloudy)])
    return Path(path)


# ---------------------------------------------------------------------------------------------------------------
# Time series (SEN12MS-CR-TS): one row per date, the rows of a series together in time order

TS_HEADER = ("split", "roi", "patch", "t", "date", "s1", "s2")
TS_FORMAT = ("a time-series list: header " + ",".join(TS_HEADER) + ", one row per date (split 1/2/3, ROI such as "
             "ROIs1970/20, patch number, date index t, Sentinel-2 date YYYY-MM-DD, S1 and S2 paths relative to the "
             "data root)")
_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


@dataclass(frozen=True)
class TimeSeries:
    """One patch of a SEN12MS-CR-TS ROI over its dates; paths relative to the data root, one per date, in time
    order. dates are the Sentinel-2 acquisition dates (an S1 file's own date is in its name); t the date indices
    (the layout's folder numbers, 0..29)."""
    split: int
    roi: str
    patch: int
    s1: tuple
    s2: tuple
    dates: tuple
    t: tuple = ()

    @property
    def name(self):
        """ROIs1970_20_patch_12: names what is written for this series."""
        return f"{self.roi.replace('/', '_')}_patch_{self.patch}"


def _ts_row(row, where):
    """A 7-column time-series row -> (split, roi, patch, t, date, s1, s2); DataError naming `where`."""
    if len(row) != len(TS_HEADER):
        raise DataError(f"{where}: expected {len(TS_HEADER)} columns ({','.join(TS_HEADER)}), got {len(row)}: {row}")
    split, roi, patch, t, date, s1, s2 = (c.strip() for c in row)
    split = str(SPLIT_WORDS.get(split.lower(), split))
    if split not in ("1", "2", "3"):
        raise DataError(f"{where}: split must be 1 (train), 2 (val) or 3 (test), got {split!r}")
    if not (patch.isdigit() and t.isdigit()):
        raise DataError(f"{where}: patch and t must be whole numbers, got {patch!r} and {t!r}")
    if not _DATE_RE.match(date):
        raise DataError(f"{where}: date must be YYYY-MM-DD, got {date!r}")
    if not (roi and s1 and s2):
        raise DataError(f"{where}: empty ROI or file name in {row}")
    return int(split), roi, int(patch), int(t), date, s1, s2


def read_ts_list(csv_path):
    """Read a time-series list (TS_FORMAT, what `dataloader.py scan` writes for a SEN12MS-CR-TS tree) -> list of
    TimeSeries in file order. A malformed row, a date index listed twice, dates out of order or one series in two
    splits is a DataError naming file:line."""
    csv_path = Path(csv_path)
    lines = _list_text(csv_path).splitlines()
    rows = [(n, row) for n, row in enumerate(csv.reader(lines, delimiter=_list_delimiter(lines[0] if lines else "")),
                                             start=1) if row and "".join(row).strip()]
    if not rows or tuple(c.strip() for c in rows[0][1]) != TS_HEADER:
        first = ",".join(rows[0][1]) if rows else "(empty)"
        raise DataError(f"{csv_path}:1: not a time-series list (first row {first!r}); read: {TS_FORMAT}")
    series, first_line = {}, {}
    for lineno, row in rows[1:]:
        where = f"{csv_path}:{lineno}"
        split, roi, patch, t, date, s1, s2 = _ts_row(row, where)
        key = (roi, patch)
        dates = series.setdefault(key, {"split": split, "dates": []})
        first_line.setdefault(key, lineno)
        if dates["split"] != split:
            raise DataError(f"{where}: {roi} patch {patch} is in split {split} here and split {dates['split']} on "
                            f"line {first_line[key]}: a series belongs to one split")
        if dates["dates"] and t <= dates["dates"][-1][0]:
            raise DataError(f"{where}: {roi} patch {patch}: date index t={t} after t={dates['dates'][-1][0]}; list "
                            f"a series' dates once each, in time order")
        if dates["dates"] and date < dates["dates"][-1][1]:
            raise DataError(f"{where}: {roi} patch {patch}: date {date} before {dates['dates'][-1][1]}")
        dates["dates"].append((t, date, s1, s2))
    if not series:
        raise DataError(f"{csv_path}: no data rows")
    return [TimeSeries(v["split"], roi, patch, tuple(d[2] for d in v["dates"]), tuple(d[3] for d in v["dates"]),
                       tuple(d[1] for d in v["dates"]), tuple(d[0] for d in v["dates"]))
            for (roi, patch), v in series.items()]


def write_ts_list(path, series):
    """Write a time-series list (TS_FORMAT), atomically."""
    with atomic_output(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(TS_HEADER)
        for s in series:
            for i, (date, s1, s2) in enumerate(zip(s.dates, s.s1, s.s2)):
                w.writerow([s.split, s.roi, s.patch, s.t[i] if s.t else i, date, s1, s2])
    return Path(path)

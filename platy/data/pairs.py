"""Preference pairs: rows of a prompt with a chosen and a rejected answer, checked, converted, and tokenized
with the same template or chat template as supervised rows (platy/data/examples.py renders both).

Row layouts (one file may mix them):
    {"instruction", "input"?, "chosen", "rejected"}      the Alpaca layout
    {"prompt" | "messages", "chosen", "rejected"}         the conversation so far (text, or turns ending with the
                                                          user's), and the two answers (text, or one assistant turn)
    {"chosen": [turns], "rejected": [turns]}              UltraFeedback: two whole conversations that share every
                                                          turn but the last (the answers)
"""

from platy.cli import UserError
from platy.data.examples import IGNORE_INDEX, ExampleTokenizer, masked_labels
from platy.data.rows import ASSISTANT_ROLES, conversation_messages, first_problems, read_source, to_row
from platy.data.tokenize import tokenized_batches

ANSWERS = ("chosen", "rejected")
PAIR_LAYOUTS = (
    "Every row needs 'chosen' and 'rejected' answers (text, or one assistant message) and a prompt: 'instruction' "
    "(with an optional 'input'), 'prompt' (text or turns) or 'messages' (turns ending with the user's); or "
    "'chosen' and 'rejected' as whole conversations that differ only in their last, assistant turn"
)


def load_pairs(data_path, flag="--data_path"):
    """The checked pairs of a local file or data set id, and a fingerprint of its content. Each pair is
    {"row": its number in the file, "prompt": an Alpaca prompt (instruction, input) or {"messages": [...]},
    "chosen": text, "rejected": text}."""
    rows, fingerprint = read_source(data_path, flag)
    return check_pairs(rows, str(data_path)), fingerprint


def check_pairs(rows, source):
    """The pairs of rows; every row that is no valid pair stops the run, named by its number."""
    pairs, problems = [], []
    for number, row in enumerate(rows, start=1):
        pair, problem = to_pair(row)
        if problem:
            problems.append(f"row {number}: {problem}")
        else:
            pairs.append({"row": number, **pair})
    if problems:
        raise UserError(f"{source}: {first_problems(problems)}. {PAIR_LAYOUTS}; fix or remove those rows")
    if not pairs:
        raise UserError(f"{source}: no rows; the data set is empty")
    return pairs


def is_pair_row(row):
    """Whether a row is laid out as a preference pair: it names a 'chosen' or a 'rejected' answer (to_pair says
    whether it is a valid one)."""
    return isinstance(row, dict) and any(key in row for key in ANSWERS)


def to_pair(row):
    """({"prompt", "chosen", "rejected"}, None), or (None, the reason the row is no preference pair)."""
    if not isinstance(row, dict):
        return None, f"expected an object with a prompt, 'chosen' and 'rejected', got {type(row).__name__}"
    missing = [key for key in ANSWERS if key not in row or row[key] is None]
    if missing:
        return None, f"missing '{missing[0]}'"
    # UltraFeedback rows may carry the first question as 'prompt' too: the conversations hold it already
    if all(is_conversation(row[key]) for key in ANSWERS) and not ("instruction" in row or "messages" in row):
        prompt, answers, problem = split_conversations(row)
    else:
        prompt, problem = pair_prompt(row)
        answers = [None, None]
        for k, key in enumerate(ANSWERS):
            answers[k], answer_problem = answer_text(row[key], key)
            problem = problem or answer_problem
    if problem:
        return None, problem
    chosen, rejected = answers
    if chosen.strip() == rejected.strip():
        return None, "'chosen' and 'rejected' are the same answer; a pair must prefer one answer to another"
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}, None


def is_conversation(value):
    """A list of more than one turn (an UltraFeedback answer holds the whole conversation)."""
    return isinstance(value, list) and len(value) > 1


def pair_prompt(row):
    """(the prompt of an Alpaca, prompt or messages row, None), or (None, the problem)."""
    if "instruction" in row:
        instruction, given_input = row["instruction"], row.get("input") or ""
        if not isinstance(instruction, str) or not instruction.strip():
            return None, "'instruction' is blank" if isinstance(instruction, str) else "'instruction' is not text"
        if not isinstance(given_input, str):
            return None, f"'input' is {type(given_input).__name__}, not text"
        return {"instruction": instruction, "input": given_input}, None
    key = next((k for k in ("prompt", "messages") if k in row), None)
    if key is None:
        return None, f"no prompt ('instruction', 'prompt' or 'messages'); the row has {', '.join(sorted(row))}"
    value = row[key]
    if isinstance(value, str):
        if not value.strip():
            return None, f"'{key}' is blank"
        return {"instruction": value, "input": ""}, None
    messages, problem = conversation_messages({"messages": value}, to_answer=True)
    if problem:
        return None, f"'{key}': {problem}"
    return {"messages": messages}, None


def answer_text(value, key):
    """(the text of an answer given as text, an assistant message or a list of one, None), or (None, the problem)."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        role = str(value.get("role", value.get("from", "assistant"))).lower()
        if role not in ASSISTANT_ROLES:
            return None, f"'{key}' is a {role} message; the answers are the assistant's"
        value = value.get("content", value.get("value"))
    if not isinstance(value, str):
        return None, f"'{key}' is {type(value).__name__}, not text or one assistant message"
    if not value.strip():
        return None, f"'{key}' is blank"
    return value, None


def split_conversations(row):
    """UltraFeedback's whole conversations as (prompt, [chosen, rejected], None): the turns both share, and
    each last assistant turn; or (None, None, the problem)."""
    conversations = []
    for key in ANSWERS:
        messages, problem = conversation_messages({"messages": row[key]})
        if problem:
            return None, None, f"'{key}': {problem}"
        conversations.append(messages)
    chosen, rejected = conversations
    if chosen[:-1] != rejected[:-1]:
        return (
            None,
            None,
            (
                "'chosen' and 'rejected' are conversations that differ before their last turn; a pair's two "
                "conversations share every turn but the answer"
            ),
        )
    return {"messages": chosen[:-1]}, [chosen[-1]["content"], rejected[-1]["content"]], None


def sft_row(prompt, answer):
    """The supervised row of a prompt and one answer, as platy/data/examples.py renders it: Alpaca fields, and a
    conversation's messages (with its Alpaca fields where it is one exchange, as to_row gives them)."""
    if "messages" not in prompt:
        return {**prompt, "output": answer}
    entry, _ = to_row({"messages": [*prompt["messages"], {"role": "assistant", "content": answer}]})
    return entry


class PairTokenizer:
    """Both answers of each pair as [BOS] prompt answer end-of-turn, rendered by ExampleTokenizer exactly as a
    supervised row with that answer would be (template or chat template), labels on the answer only."""

    def __init__(self, tokenizer, prompter, cutoff_len, add_eos_token=False, chat_template=None):
        self.examples = ExampleTokenizer(
            tokenizer,
            prompter,
            cutoff_len,
            train_on_inputs=False,
            add_eos_token=add_eos_token,
            chat_template=chat_template,
        )
        self.cutoff_len = cutoff_len
        self.chat_template = chat_template
        if chat_template is None:
            self.end_ids = {tokenizer.eos_token_id}
            self.end_texts = [tokenizer.eos_token]
        else:
            self.end_ids = set(chat_template.end_of_turn_ids(tokenizer))
            self.end_texts = list(chat_template.end_of_turn)

    def without_end_of_turn(self, answer):
        """(answer, whether it lost a trailing end-of-turn text): the renderer adds that token once itself."""
        trimmed = answer.rstrip()
        for text in self.end_texts:
            if text and trimmed.endswith(text):
                return trimmed[: -len(text)].rstrip(), True
        return answer, False

    def __call__(self, pairs, source):
        """(columns of the tokenized pairs, stats). A pair whose prompt leaves no answer token within cutoff_len,
        or an answer holding its end-of-turn token inside, stops the run naming its row."""
        stripped = 0
        rows = {key: [] for key in ANSWERS}
        for pair in pairs:
            for key in ANSWERS:
                answer, lost = self.without_end_of_turn(pair[key])
                stripped += lost
                rows[key].append(sft_row(pair["prompt"], answer))
        columns = {"row": [pair["row"] for pair in pairs]}
        problems, truncated = [], 0
        for key in ANSWERS:
            part = self.compact(rows[key])
            columns[f"{key}_input_ids"], columns[f"{key}_labels"] = [], []
            for pair, ids, masked, n_response, cut in zip(
                pairs, part["input_ids"], part["masked"], part["n_response"], part["truncated"]
            ):
                labels = masked_labels(ids, masked)
                if labels:  # a conversation whose prompt fills cutoff_len keeps no token at all (n_response is 0)
                    labels[0] = IGNORE_INDEX  # labels are shifted inside the model: position 0 is never a target
                if n_response == 0:
                    problems.append(
                        f"row {pair['row']}: the prompt alone fills --cutoff_len {self.cutoff_len}, leaving no "
                        f"token of the {key} answer"
                    )
                elif not cut and self.end_count(ids, labels) != 1:
                    problems.append(
                        f"row {pair['row']}: the {key} answer holds its end-of-turn token inside its text; remove it"
                    )
                truncated += cut
                columns[f"{key}_input_ids"].append(ids)
                columns[f"{key}_labels"].append(labels)
        if problems:
            raise UserError(f"{source}: {first_problems(problems, 'more')}. Raise --cutoff_len or fix those rows")
        stats = {
            "pairs": len(pairs),
            "answers_cut_at_cutoff_len": truncated,
            "end_of_turn_text_removed": stripped,
            "tokens": sum(len(ids) for key in ANSWERS for ids in columns[f"{key}_input_ids"]),
        }
        return columns, stats

    def compact(self, rows):
        """ExampleTokenizer.compact's columns of all rows, tokenized in batches as supervised rows are."""
        out = {}
        for part in tokenized_batches(rows, self.examples):
            for key, values in part.items():
                out.setdefault(key, []).extend(values)
        return out

    def end_count(self, ids, labels):
        """How many end-of-turn tokens the answer's labels hold (one, at its end, when rendered right)."""
        return sum(1 for tok, label in zip(ids, labels) if label != IGNORE_INDEX and tok in self.end_ids)


def tokenize_pairs(pairs, pair_tokenizer, source):
    """A datasets.Dataset of the tokenized pairs (None for no pairs) and its stats."""
    import datasets

    if not pairs:
        return None, {"pairs": 0, "answers_cut_at_cutoff_len": 0, "end_of_turn_text_removed": 0, "tokens": 0}
    columns, stats = pair_tokenizer(pairs, source)
    return datasets.Dataset.from_dict(columns), stats
